"""GPU kernel: cuDNN flash attention through JAX, for chunk pairs and whole calls.

A chunk pair runs as cuDNN MQA with the rows layout viewed as `[batch*kv_heads, positions,
group, head_dim]` (a free reshape, no K/V repeat). Two things need JAX's cuDNN wrapper below the
public API (`jax._src.cudnn.fused_attention_stablehlo`), each checked at import and replaced by
the pure-JAX path when this JAX version differs:

- the forward's float32 log-sum-exp: `jax.nn.dot_product_attention(return_residual=True)` casts
  it to the input dtype, and bfloat16 would shift merge weights by up to ~3%;
- the backward fed the *global* output and log-sum-exp of the merged attention: cuDNN's own VJP
  would use the chunk's own statistics (and ignores a cotangent on the residual), which is wrong
  once chunks are merged. Fed the global ones, its recomputed probabilities are the final ones.

A whole call that merges nothing (`Kernel.attention`) uses the public API and cuDNN's own VJP.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from lwm_jax.attention.kernels.base import Kernel
from lwm_jax.attention.kernels.rows import Meta, Tiling

try:
    from jax._src.cudnn import fused_attention_stablehlo as _fa  # JAX internal, may move: checked here at import
except ImportError:  # pragma: no cover - depends on the JAX version
    _fa = None

_cudnn_attention = getattr(_fa, "dot_product_attention", None)
_MaskType = getattr(_fa, "MaskType", None)
_BWD_RULE = getattr(_fa, "_dot_product_attention_bwd_rule", None)
_BWD_PARAMS = ("scale", "seed", "dropout_rate", "variadic_args", "mask_type", "layout",
               "sliding_window_length", "is_training", "return_residual", "res", "grad_output")
if _BWD_RULE is not None and tuple(inspect.signature(_BWD_RULE).parameters) != _BWD_PARAMS:
    _BWD_RULE = None  # a JAX version with another internal layout: use the pure-JAX backward


class CudnnKernel(Kernel):
    name = "cudnn"
    platforms = ("gpu",)

    def supports(self, *, dtype, head_dim, segments):
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"dtype {jnp.dtype(dtype).name} (cuDNN flash attention takes bfloat16 or float16)"
        if head_dim % 8 or head_dim > 256:
            return f"head_dim={head_dim} (cuDNN needs a multiple of 8, at most 256)"
        if segments:
            return "segment_ids (packed documents) are not wired to cuDNN; use kernel='xla'"
        if _cudnn_attention is None:
            return "this JAX version does not expose cuDNN's float32 log-sum-exp"
        return None

    def forward(self, q, k, v, meta: Meta, tiling: Tiling, *, causal):
        bk, rows, d = q.shape
        q4 = q.reshape(bk, rows // tiling.group, tiling.group, d)  # BTNH with N = group
        k4, v4 = k[:, :, None, :], v[:, :, None, :]  # one KV head per batch entry
        mask_type = _MaskType.CAUSAL if causal else _MaskType.NO_MASK
        out, lse = _cudnn_attention(q4, k4, v4, scale=tiling.scale, mask_type=mask_type,
                                    return_residual=True)
        lse = jnp.transpose(lse, (0, 2, 1)).reshape(bk, rows)  # cuDNN gives [B, N, T]
        return out.reshape(bk, rows, d).astype(jnp.float32), lse.astype(jnp.float32)

    def backward(self, q, k, v, out, dout, lse, meta: Meta, tiling: Tiling, *, causal):
        if _BWD_RULE is None:
            return super().backward(q, k, v, out, dout, lse, meta, tiling, causal=causal)
        bk, rows, d = q.shape
        g = tiling.group
        view = lambda x: x.reshape(bk, rows // g, g, d).astype(q.dtype)
        stats = jnp.transpose(lse.reshape(bk, rows // g, g), (0, 2, 1)).astype(jnp.float32)  # [B, N, T]
        unused = jnp.zeros(0, q.dtype)
        # Residuals as the cuDNN forward rule saves them, with the global statistics.
        res = (view(q), k[:, :, None, :], v[:, :, None, :], unused, unused, unused, unused, unused,
               unused, unused, stats, view(out))
        mask_type = _MaskType.CAUSAL if causal else _MaskType.NO_MASK
        grads = _BWD_RULE(tiling.scale, 42, 0.0, (False, False), mask_type, _fa.AttentionLayout.BTNH.value,
                          None, _fa.check_cudnn_version(), False, res, view(dout))
        dq, dk, dv = grads[:3]
        return (dq.reshape(bk, rows, d).astype(jnp.float32), dk[:, :, 0].astype(jnp.float32),
                dv[:, :, 0].astype(jnp.float32))

    def attention(self, q, k, v, *, causal):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


CUDNN = CudnnKernel()
