"""Single-device flash-style attention: tiled, online softmax, backward that recomputes blocks.

The whole sequence is one diagonal chunk pair of the kernel interface (`attention.kernels`): the
forward runs the selected kernel (pure-JAX `xla` on CPU), the `custom_vjp` backward recomputes
each block's probabilities from the saved log-sum-exp, so no `[seq, seq]` scores are stored.
Input checks shared with `ring` live here too.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from lwm_jax.attention import kernels as K
from lwm_jax.errors import UserError


def check_inputs(q, k, v, segment_ids, positions) -> None:
    """Raises UserError unless shapes follow `q: [b, s, h, d]`, `k, v: [b, s, kv, d]`, ids `[b, s]`."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise UserError(f"attention expects 4-D q, k, v [batch, seq, heads, head_dim]; got shapes "
                        f"{q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise UserError(f"k shape {k.shape} and v shape {v.shape} must match")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise UserError(f"q shape {q.shape} and k shape {k.shape} must share batch, seq and head_dim")
    q_heads, kv_heads = q.shape[2], k.shape[2]
    if q_heads % kv_heads:
        raise UserError(f"q_heads={q_heads} must be divisible by kv_heads={kv_heads}")
    for name, ids in (("segment_ids", segment_ids), ("positions", positions)):
        if ids is not None and tuple(ids.shape) != tuple(q.shape[:2]):
            raise UserError(f"{name} shape {tuple(ids.shape)} must be [batch, seq] = {tuple(q.shape[:2])}")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything about a blockwise call that is not an array (hashable: a custom_vjp static arg)."""

    tiling: K.Tiling
    causal: bool
    kernel: K.Kernel


def blockwise_attention(q, k, v, *, segment_ids=None, positions=None, causal: bool = True,
                        block_size: int = 512, kernel: str = "auto"):
    """Returns `[batch, seq, q_heads, head_dim]` in `q.dtype` (same contract as `reference`).

    Blocks are `block = min(block_size, seq)` positions; `seq` must be a multiple of `block`.
    `kernel`: `auto` (the platform's fused kernel when it supports the call, else `xla`), or a
    name from `attention.kernels.kernel_names()`. Causality is by positions; within a segment,
    positions must increase with sequence order (true for packed documents).
    """
    check_inputs(q, k, v, segment_ids, positions)
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    block = min(block_size, seq)
    if block < 1 or seq % block:
        raise UserError(f"seq_len={seq} must be divisible by block={block} "
                        f"(block = min(block_size={block_size}, seq_len))")
    chosen = K.select_kernel(kernel, dtype=q.dtype, head_dim=head_dim, segments=segment_ids is not None,
                             whole=segment_ids is None)
    if segment_ids is None:
        whole = chosen.attention(q, k, v, causal=causal)  # a fused kernel's own VJP: nothing to merge
        if whole is not None:
            return whole.astype(q.dtype)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    group = q_heads // kv_heads
    static = _Static(K.Tiling(group, block, 1.0 / math.sqrt(head_dim)), causal, chosen)
    meta = K.Meta(K.ids_to_rows(positions, kv_heads, group), K.ids_to_rows(segment_ids, kv_heads, group),
                  K.ids_to_kv(positions, kv_heads), K.ids_to_kv(segment_ids, kv_heads))
    out = _attend(K.q_to_rows(q, kv_heads), K.kv_to_rows(k), K.kv_to_rows(v), meta, static)
    return K.rows_to_q(out, batch, q_heads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, meta, static: _Static):
    return _attend_fwd(q, k, v, meta, static)[0]


def _attend_fwd(q, k, v, meta, static: _Static):
    out, lse = static.kernel.forward(q, k, v, meta, static.tiling, causal=static.causal)
    out = out.astype(q.dtype)
    return out, (q, k, v, meta, out, lse)


def _attend_bwd(static: _Static, res, dout):
    q, k, v, meta, out, lse = res
    dq, dk, dv = static.kernel.backward(q, k, v, out, dout, lse, meta, static.tiling, causal=static.causal)
    no_grad = jax.tree.map(lambda _: None, meta)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), no_grad


_attend.defvjp(_attend_fwd, _attend_bwd)
