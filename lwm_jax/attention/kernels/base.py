"""The kernel interface: what a fused chunk-pair kernel implements, with the pure-JAX blocks
(`xla`) as the default backward, and `XlaKernel`, the portable kernel every platform has.
"""

from __future__ import annotations

import jax.numpy as jnp

from lwm_jax.attention.kernels.rows import Meta, Tiling
from lwm_jax.attention.kernels.xla import backward_lse, chunk_backward, chunk_forward


class Kernel:
    """A fused chunk-pair kernel for one platform: `forward` always, `backward`, `attention` and
    `supports` where the kernel can do better than the defaults."""

    name: str = "base"
    platforms: tuple[str, ...] = ()

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


XLA = XlaKernel()
