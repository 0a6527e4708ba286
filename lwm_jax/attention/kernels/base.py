"""The kernel interface: what a fused chunk-pair kernel implements, with the pure-JAX blocks
(`xla`) as the default backward, and `XlaKernel`, the portable kernel every platform has.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lwm_jax.attention.kernels.rows import Meta, Tiling
from lwm_jax.attention.kernels.xla import (
    backward_lse,
    chunk_backward,
    chunk_backward_into,
    chunk_forward,
    chunk_forward_into,
    merge_rows,
)


class Kernel:
    """A fused chunk-pair kernel for one platform: `forward` always, `backward`, `attention` and
    `supports` where the kernel can do better than the defaults."""

    name: str = "base"
    platforms: tuple[str, ...] = ()
    # Whether `backward_into` needs Python-int starts (block offsets in a fused kernel's index maps);
    # the ring then resolves a traced chunk slot with `lax.cond` before calling it.
    static_offsets: bool = False

    def supports(self, *, dtype, head_dim: int, segments: bool) -> str | None:
        """None when this kernel can run the call, else why not (one line)."""
        return None

    def forward(self, q, k, v, meta: Meta, tiling: Tiling, *, causal: bool):
        """`(out [bk, rows, d] float32, lse [bk, rows] float32)` of query rows against keys.

        `causal`: the pair is diagonal (queries and keys are the same positions); keys later in
        the chunk are masked (by positions), and blocks above the diagonal are not computed.
        Otherwise every key is visible except across segments.
        """
        raise NotImplementedError

    def backward(self, q, k, v, out, dout, lse, meta: Meta, tiling: Tiling, *, causal: bool):
        """`(dq, dk, dv)` float32 of one chunk pair, given the *global* (merged) `out` and `lse` of
        its query rows. Default: the pure-JAX blocks."""
        delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        return chunk_backward(q, k, v, dout, backward_lse(lse), delta, meta, tiling, causal=causal)

    def forward_into(self, q, k, v, meta: Meta, tiling: Tiling, out, lse, *, causal: bool, q_start, k_start,
                     n_rows: int, n_keys: int):
        """The ring's forward of one chunk pair: query rows `[q_start, +n_rows)` of `q` against keys
        `[k_start, +n_keys)` of `k, v`, log-sum-exp merged (float32) into those rows of the
        accumulators `out [bk, R, d]`, `lse [bk, R]`; returns them. Default: `forward` on the
        sliced pair, then the merge."""
        rows = lambda x, s, n: None if x is None else jax.lax.dynamic_slice_in_dim(x, s, n, 1)
        pair_meta = meta.slice(q_start, n_rows, k_start, n_keys)
        o_p, lse_p = self.forward(rows(q, q_start, n_rows), rows(k, k_start, n_keys), rows(v, k_start, n_keys),
                                  pair_meta, tiling, causal=causal)
        return merge_rows(out, lse, o_p, lse_p, q_start)

    def backward_into(self, q, k, v, dout, lse, delta, meta: Meta, tiling: Tiling, dq_acc, *, causal: bool,
                      q_start, k_start, n_rows: int, n_keys: int):
        """The ring's backward of one chunk pair, read in place from the whole local arrays: query
        rows `[q_start, +n_rows)` of `q, dout` and of the *global* `lse` (from `backward_lse`) and
        `delta` against keys `[k_start, +n_keys)` of `k, v`; returns `(dq_acc, dk, dv)`, the pair's
        dQ added into those rows of the float32 accumulator `dq_acc`, its dK, dV `[bk, n_keys, d]`
        float32. Starts are multiples of `n_rows` and `n_keys`. Default: the pure-JAX blocks."""
        return chunk_backward_into(q, k, v, dout, lse, delta, meta, tiling, dq_acc, causal=causal,
                                   q_start=q_start, k_start=k_start, n_rows=n_rows, n_keys=n_keys)

    def attention(self, q, k, v, *, causal: bool):
        """Whole single-device attention `[batch, seq, heads, dim]` with the kernel's own VJP,
        for calls that merge nothing (no segments); None when the kernel has no such path."""
        return None

    def __repr__(self):
        return f"<attention kernel {self.name}>"


class XlaKernel(Kernel):
    """The pure-JAX kernel: every platform, every dtype, segments supported."""

    name = "xla"
    platforms = ()

    def forward(self, q, k, v, meta, tiling, *, causal):
        return chunk_forward(q, k, v, meta, tiling, causal=causal)

    def forward_into(self, q, k, v, meta, tiling, out, lse, *, causal, q_start, k_start, n_rows, n_keys):
        return chunk_forward_into(q, k, v, meta, tiling, out, lse, causal=causal, q_start=q_start,
                                  k_start=k_start, n_rows=n_rows, n_keys=n_keys)


XLA = XlaKernel()
