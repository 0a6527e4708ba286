"""GPU kernel: cuDNN flash attention through the public `jax.nn.dot_product_attention`, for whole
calls; chunk pairs (ring steps, merged blocks) run the pure-JAX blocks.

A merged chunk needs two things no public API gives (JAX 0.10-0.12, tokamax 0.0.12):
- a float32 log-sum-exp: `return_residual=True` casts it to the input dtype, and in bfloat16 an
  lse near 16 is off by up to 0.06, a merge weight by up to 6%;
- a backward fed the merged output and lse: the public VJP recomputes with the call's own
  statistics and drops the residual's cotangent, so a chunk's gradient would miss its share
  `w * P * (dout . (o_chunk - o))`. tokamax's public `dot_product_attention` returns the output
  only; its residual-taking kernels live under `tokamax._src`, private again.
So only calls that merge nothing (`Kernel.attention`: blockwise on one device, or Ulysses with
no ring; no segments) use cuDNN, with its own VJP; everything merged is exact pure JAX (float32
math on bfloat16 inputs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lwm_jax.attention.kernels.base import XlaKernel

_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True, eq=True)
class CudnnKernel(XlaKernel):
    """`implementation`: what `jax.nn.dot_product_attention` runs whole calls with; `"xla"` runs
    the same public call on any backend (how the CPU tests check the wiring)."""

    implementation: str = "cudnn"
    name: str = "cudnn"
    platforms: tuple[str, ...] = ("gpu",)

    def supports(self, *, dtype, head_dim, segments):
        if self.implementation == "cudnn" and jnp.dtype(dtype) not in _CUDNN_DTYPES:
            return f"dtype {jnp.dtype(dtype).name} (cuDNN flash attention takes bfloat16 or float16)"
        if head_dim % 8 or head_dim > 256:
            return f"head_dim={head_dim} (cuDNN needs a multiple of 8, at most 256)"
        if segments:
            return "segment_ids (packed documents) are not wired to cuDNN; use kernel='xla'"
        return None

    def attention(self, q, k, v, *, causal):
        """Public cuDNN attention, GQA native (K/V are not repeated), with its own VJP."""
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=self.implementation)


CUDNN = CudnnKernel()
