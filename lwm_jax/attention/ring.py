"""Sequence-parallel attention over the mesh's `ulysses` and `sp` axes (either may be size 1):
DeepSpeed-Ulysses inside a node, the zigzag ring across.

The sequence is in the zigzag layout over `sp` (`attention.layout`): cut into `2*sp` chunks, sp
shard `r` holds chunk `r` ("early", slot 0) and chunk `2*sp-1-r` ("late", slot 1), split contiguously
over `ulysses`. Per device, an all-to-all over `ulysses` (`attention.ulysses`) first trades its
sequence shard for a head shard: it then holds the whole sp shard for `1/ulysses` of the heads
(GQA-aware: KV heads split, or the one each device needs). The ring runs on that, and the output
goes back the same way. At ring step `t` device `r` holds the keys and values of device
`src = r - t` and computes, through the chunk-pair kernel (`attention.kernels`), only the chunk
pairs that causality leaves visible:

- step 0 (its own KV): the causal triangle over its two chunks (blocks above the diagonal skipped);
- step t > 0: two fully visible chunk pairs, (late queries, early keys) and, if `src < r`,
  (early queries, early keys), else (late queries, late keys).

So every device does the same work at every step. Only the KV heads travel (GQA-native); their
positions and segment ids travel with them, so packed documents stay correct across steps. Chunk
results are merged in float32 through their log-sum-exp. The per-device ring is a `custom_vjp`
whose backward runs the same schedule, recomputing blocks from the output and log-sum-exp, while
dK/dV accumulators travel with their KV block and take one last step home; autodiff transposes the
Ulysses exchange around it. Batch is sharded over (dp, fsdp) and heads over tp at the same time;
everything a device stores is linear in its local sequence length.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from lwm_jax.attention import kernels as K
from lwm_jax.attention import ulysses as U
from lwm_jax.attention.blockwise import check_inputs
from lwm_jax.attention.kernels.xla import backward_lse
from lwm_jax.attention.layout import check_heads, check_mesh, ring_block, zigzag_indices
from lwm_jax.errors import UserError
from lwm_jax.parallel.mesh import BATCH_AXES, HEADS_AXIS, SEQ_AXES, SP, ULYSSES, axis_sizes

# Static plan -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Pair:
    """A chunk pair of one ring step: `span` chunks of queries from chunk slot `q_slot` against
    `span` chunks of keys from `kv_slot` (slots may be traced); `diagonal`: causal triangle."""

    q_slot: Any
    kv_slot: Any
    span: int
    diagonal: bool


def _pairs(step: int | None, src, rank, causal: bool) -> list[_Pair]:
    """The chunk pairs device `rank` computes on the KV of device `src` (`step` 0: its own KV;
    None: a later step). Shared by the executor (traced ranks) and `ring_block_pairs` (ints)."""
    if not causal:
        return [_Pair(0, 0, 2, False)]
    if step == 0:
        return [_Pair(0, 0, 2, True)]
    later = (src > rank) * 1  # KV from a later device: only our late chunk sees its chunks
    return [_Pair(1, 0, 1, False), _Pair(later, later, 1, False)]


def ring_block_pairs(seq_len: int, sp: int, block_size: int = 512, causal: bool = True) -> np.ndarray:
    """Block pairs each device computes (`[sp]`), from the schedule the ring executes."""
    nb = seq_len // (2 * sp) // ring_block(seq_len, sp, block_size)
    counts = np.zeros(sp, np.int64)
    for rank in range(sp):
        for t in range(sp):
            for pair in _pairs(0 if t == 0 else None, (rank - t) % sp, rank, causal):
                n = pair.span * nb
                counts[rank] += n * (n + 1) // 2 if pair.diagonal else n * n
    return counts


def causal_min_block_pairs(seq_len: int, sp: int, block_size: int = 512) -> int:
    """Block pairs holding at least one visible (query, key) pair under plain causal masking."""
    n = seq_len // ring_block(seq_len, sp, block_size)
    return n * (n + 1) // 2


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Everything about a ring call that is not an array (a hashable custom_vjp static arg);
    `kv_slots`: the local KV head each ulysses device receives (None: the KV heads split)."""

    sp: int
    ulysses: int
    tiling: K.Tiling
    causal: bool
    kernel: K.Kernel
    kv_slots: tuple[int, ...] | None
    whole: bool = False  # sp=1, natural positions, no segments: the kernel's whole-call path may run


# Entry point -----------------------------------------------------------------------------------


def ring_attention(q, k, v, *, segment_ids=None, positions=None, causal: bool = True,
                   block_size: int = 512, kernel: str = "auto"):
    """Returns `[batch, seq, q_heads, head_dim]` in `q.dtype`; inputs are in the zigzag layout.

    Runs over the mesh set with `jax.set_mesh` (sequence over `sp` and `ulysses`; batch over `dp,
    fsdp`, heads over `tp`). `positions=None` means the natural positions of the unpermuted
    sequence. Blocks are `min(block_size, seq_len // (2*sp))` positions. Within a segment positions
    must increase with natural order (true for packed documents).
    """
    check_inputs(q, k, v, segment_ids, positions)
    mesh = jax.sharding.get_abstract_mesh()
    check_mesh("ring", mesh)
    names, sizes = set(mesh.axis_names), axis_sizes(mesh)
    sp, ulysses = sizes[SP], sizes[ULYSSES]
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    block = ring_block(seq, sp, block_size, ulysses)
    batch_axes = tuple(a for a in BATCH_AXES if a in names)
    n_batch = math.prod(sizes[a] for a in batch_axes)
    if batch % n_batch:
        raise UserError(f"batch={batch} must be divisible by {'*'.join(batch_axes)}={n_batch} "
                        "(ring attention shards the batch over them)")
    heads_axis = HEADS_AXIS if HEADS_AXIS in names else None
    tp = sizes[HEADS_AXIS]
    check_heads(q_heads, kv_heads, tp, ulysses)
    slots = U.kv_slots(kv_heads // tp, ulysses)
    kv_per_device = 1 if slots is not None else kv_heads // tp // ulysses
    whole = sp == 1 and positions is None and segment_ids is None
    chosen = K.select_kernel(kernel, dtype=q.dtype, head_dim=head_dim, segments=segment_ids is not None,
                             whole=whole)
    if positions is None:
        natural = jnp.asarray(zigzag_indices(seq, sp), jnp.int32)
        positions = jnp.broadcast_to(natural, (batch, seq))
    tiling = K.Tiling(q_heads // tp // ulysses // kv_per_device, block, 1.0 / math.sqrt(head_dim))
    cfg = _Ring(sp, ulysses, tiling, causal, chosen, None if slots is None else tuple(slots.tolist()), whole)
    b, seq_axes = batch_axes or None, tuple(a for a in SEQ_AXES if a in names) or None
    x_spec, id_spec = P(b, seq_axes, heads_axis, None), P(b, seq_axes)
    return jax.shard_map(
        functools.partial(_device_attention, cfg=cfg), mesh=mesh,
        in_specs=(x_spec, x_spec, x_spec, id_spec, id_spec if segment_ids is not None else None),
        out_specs=x_spec, check_vma=False)(q, k, v, positions, segment_ids)


def _device_attention(q, k, v, positions, segment_ids, *, cfg: _Ring):
    """One device: Ulysses in (sequence shard -> head shard), the ring over sp, Ulysses out.

    With no ring to merge over (sp=1, natural positions, no segments) the local sequence is in
    natural order and a fused kernel's whole call (`Kernel.attention`, its own VJP) runs instead."""
    if cfg.ulysses > 1:
        slots = None if cfg.kv_slots is None else np.asarray(cfg.kv_slots)
        q, k, v = U.to_heads(q), U.to_heads(k, slots), U.to_heads(v, slots)
        positions, segment_ids = U.gather_ids(positions), U.gather_ids(segment_ids)
    whole = cfg.kernel.attention(q, k, v, causal=cfg.causal) if cfg.whole else None
    out = whole.astype(q.dtype) if whole is not None else _local_ring(q, k, v, positions, segment_ids, cfg)
    return U.to_sequence(out) if cfg.ulysses > 1 else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _local_ring(q, k, v, positions, segment_ids, cfg: _Ring):
    return _local_forward(q, k, v, (positions, segment_ids), cfg=cfg)[0]


def _local_ring_fwd(q, k, v, positions, segment_ids, cfg: _Ring):
    out, lse = _local_forward(q, k, v, (positions, segment_ids), cfg=cfg)
    return out, (q, k, v, positions, segment_ids, out, lse)


def _local_ring_bwd(cfg: _Ring, res, dout):
    q, k, v, positions, segment_ids, out, lse = res
    dq, dk, dv = _local_backward(q, k, v, (positions, segment_ids), out, lse, dout, cfg=cfg)
    return dq, dk, dv, None, None


_local_ring.defvjp(_local_ring_fwd, _local_ring_bwd)


# Per-device work (inside shard_map) ------------------------------------------------------------


def _shift(tree):
    """Sends every array of `tree` to the next device on the ring (r -> r+1)."""
    sp = lax.axis_size(SP)
    return jax.tree.map(lambda x: lax.ppermute(x, SP, [(i, (i + 1) % sp) for i in range(sp)]), tree)


def _ring_loop(sp: int, kv, carry, step):
    """Runs `carry = step(t, kv_t, carry)` for t = 1..sp-1, `kv_t` being the KV of device r - t.

    The block for step t+1 is sent while step t computes; the last send is unused (1/sp of the
    ring's traffic, hidden under compute), which keeps one copy of the step in the program.
    """
    if sp == 1:
        return carry

    def body(t, state):
        kv_t, carry = state
        return _shift(kv_t), step(t, kv_t, carry)

    return lax.fori_loop(1, sp, body, (_shift(kv), carry))[1]


def _rows(x, start, size):
    return lax.dynamic_slice_in_dim(x, start, size, 1)


def _local_forward(q, k, v, ids, *, cfg: _Ring):
    """The ring's forward. Each chunk pair runs as its own kernel call reading its query rows and
    keys in place, merged into the float32 accumulators (`Kernel.forward_into`)."""
    batch, _, q_heads, _ = q.shape
    positions, segment_ids = ids
    kv_heads, group = k.shape[2], cfg.tiling.group
    chunk = q.shape[1] // 2
    q_rows = K.q_to_rows(q, kv_heads)
    q_ids = (K.ids_to_rows(positions, kv_heads, group), K.ids_to_rows(segment_ids, kv_heads, group))
    kv = (K.kv_to_rows(k), K.kv_to_rows(v), positions, segment_ids)
    rank = lax.axis_index(SP) if cfg.sp > 1 else 0

    def step(t, kv_t, carry):
        out, lse = carry
        k_t, v_t, k_pos, k_seg = kv_t
        meta = K.Meta(*q_ids, K.ids_to_kv(k_pos, kv_heads), K.ids_to_kv(k_seg, kv_heads))
        for pair in _pairs(0 if isinstance(t, int) and t == 0 else None, (rank - t) % cfg.sp, rank, cfg.causal):
            out, lse = cfg.kernel.forward_into(
                q_rows, k_t, v_t, meta, cfg.tiling, out, lse, causal=pair.diagonal,
                q_start=pair.q_slot * chunk * group, k_start=pair.kv_slot * chunk,
                n_rows=pair.span * chunk * group, n_keys=pair.span * chunk)
        return out, lse

    carry = (jnp.zeros(q_rows.shape, jnp.float32), jnp.full(q_rows.shape[:2], K.LSE_EMPTY, jnp.float32))
    carry = step(0, kv, carry)
    out, lse = _ring_loop(cfg.sp, kv, carry, step)
    return K.rows_to_q(out.astype(q.dtype), batch, q_heads), lse


def _static_slots(pair: _Pair, run, acc):
    """`run(q_slot, kv_slot, acc)` with Python-int slots, for kernels whose offsets are static: a
    later step's second pair, whose one slot is traced (the same for queries and keys), runs
    through `lax.cond` on it."""
    if isinstance(pair.q_slot, int) and isinstance(pair.kv_slot, int):
        return run(pair.q_slot, pair.kv_slot, acc)
    if pair.q_slot is not pair.kv_slot:
        raise ValueError("a traced chunk pair has one slot for its queries and keys")
    return lax.cond(pair.q_slot == 1, lambda a: run(1, 1, a), lambda a: run(0, 0, a), acc)


def _add(acc, x, start):
    return lax.dynamic_update_slice_in_dim(acc, _rows(acc, start, x.shape[1]) + x, start, 1)


def _local_backward(q, k, v, ids, out, lse, dout, *, cfg: _Ring):
    """The ring's backward. Each chunk pair runs as its own kernel call that reads its query rows
    and keys in place from the whole local arrays and adds its dQ into the float32 accumulator: no
    pair's rows are sliced, stacked or copied, and no pair-sized dQ exists beside the accumulator.
    `delta = sum(dout * out)` and the backward log-sum-exp are per query row, formed once."""
    batch, _, q_heads, _ = q.shape
    positions, segment_ids = ids
    kv_heads, group = k.shape[2], cfg.tiling.group
    chunk = q.shape[1] // 2
    q_rows, do_rows = K.q_to_rows(q, kv_heads), K.q_to_rows(dout, kv_heads)
    delta = jnp.sum(do_rows.astype(jnp.float32) * K.q_to_rows(out, kv_heads).astype(jnp.float32), axis=-1)
    lse_b = backward_lse(lse)
    q_ids = (K.ids_to_rows(positions, kv_heads, group), K.ids_to_rows(segment_ids, kv_heads, group))
    kv = (K.kv_to_rows(k), K.kv_to_rows(v), positions, segment_ids)
    rank = lax.axis_index(SP) if cfg.sp > 1 else 0

    def step(t, kv_t, carry):
        dq, dk, dv = carry
        if not (isinstance(t, int) and t == 0):
            dk, dv = _shift((dk, dv))  # the accumulators of kv_t arrive with it
        k_t, v_t, k_pos, k_seg = kv_t
        meta = K.Meta(*q_ids, K.ids_to_kv(k_pos, kv_heads), K.ids_to_kv(k_seg, kv_heads))
        for pair in _pairs(0 if isinstance(t, int) and t == 0 else None, (rank - t) % cfg.sp, rank, cfg.causal):
            def run(q_slot, kv_slot, acc, pair=pair):
                q0, k0 = q_slot * chunk * group, kv_slot * chunk
                n_rows, n_keys = pair.span * chunk * group, pair.span * chunk
                dq, dk, dv = acc
                dq, dk_p, dv_p = cfg.kernel.backward_into(
                    q_rows, k_t, v_t, do_rows, lse_b, delta, meta, cfg.tiling, dq, causal=pair.diagonal,
                    q_start=q0, k_start=k0, n_rows=n_rows, n_keys=n_keys)
                return dq, _add(dk, dk_p, k0), _add(dv, dv_p, k0)

            dq, dk, dv = _static_slots(pair, run, (dq, dk, dv)) if cfg.kernel.static_offsets else \
                run(pair.q_slot, pair.kv_slot, (dq, dk, dv))
        return dq, dk, dv

    zeros_kv = jnp.zeros(kv[0].shape, jnp.float32)
    carry = step(0, kv, (jnp.zeros(q_rows.shape, jnp.float32), zeros_kv, zeros_kv))
    dq, dk, dv = _ring_loop(cfg.sp, kv, carry, step)
    if cfg.sp > 1:
        dk, dv = _shift((dk, dv))  # last hop: each device gets its own KV's gradients back
    return (K.rows_to_q(dq.astype(q.dtype), batch, q_heads),
            K.rows_to_kv(dk.astype(k.dtype), batch), K.rows_to_kv(dv.astype(v.dtype), batch))
