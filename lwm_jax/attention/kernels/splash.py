"""TPU kernel: Pallas splash attention for chunk-pair forwards (GQA as MQA per KV head).

Each `[batch*kv_heads]` entry is one splash MQA call (vmapped): `group` query heads against one
key/value head, with segment ids and the float32 log-sum-exp (`save_residuals`). The backward is
the pure-JAX one with the global log-sum-exp. Only public modules: splash ships with JAX as
`jax.experimental.pallas.ops.tpu.splash_attention` (tokamax's copy is under its private `_src`).
Never run on a TPU here: it is checked on CPU in Pallas interpret mode only
(`SplashKernel(interpret=True)`), so `auto` does not pick it.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp

from lwm_jax.attention.kernels.base import Kernel
from lwm_jax.attention.kernels.rows import Meta, Tiling

_LANES = 128  # splash tiles head_dim and blocks by the TPU lane width
_MODULE = "jax.experimental.pallas.ops.tpu.splash_attention"


def _available() -> bool:
    """Whether this JAX ships the splash module (found without importing the TPU-only Pallas ops)."""
    try:
        return importlib.util.find_spec(_MODULE) is not None
    except ImportError:  # a parent package is missing
        return False


@dataclasses.dataclass(frozen=True, eq=True)
class SplashKernel(Kernel):
    interpret: bool = False
    name: str = "splash"
    platforms: tuple[str, ...] = ("tpu",)

    def supports(self, *, dtype, head_dim, segments):
        if head_dim % _LANES:
            return f"head_dim={head_dim} (splash needs a multiple of {_LANES})"
        if not _available():
            return f"this JAX {jax.__version__} has no {_MODULE}"
        return None

    def forward(self, q, k, v, meta: Meta, tiling: Tiling, *, causal):
        from jax.experimental.pallas.ops.tpu import splash_attention as splash  # TPU-only Pallas ops: load on use

        bk, rows, d = q.shape
        g, q_len, kv_len = tiling.group, rows // tiling.group, k.shape[1]
        shape = (q_len, kv_len)
        head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
        blocks = splash.BlockSizes(block_q=min(512, q_len), block_kv=min(512, kv_len),
                                   block_kv_compute=min(512, kv_len))
        kernel = splash.make_splash_mqa_single_device(
            splash.MultiHeadMask([head_mask] * g), block_sizes=blocks, save_residuals=True,
            interpret=self.interpret)
        # Splash does not scale the logits: scale the queries (the lse then includes the scale).
        qh = (q.astype(jnp.float32) * tiling.scale).astype(q.dtype)
        qh = qh.reshape(bk, q_len, g, d).transpose(0, 2, 1, 3)  # [bk, group, q_len, d]
        if meta.q_seg is not None:
            seg = splash.SegmentIds(q=meta.q_seg[:, ::g], kv=meta.k_seg)
            out, (lse,) = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=s))(qh, k, v, seg)
        else:
            out, (lse,) = jax.vmap(kernel)(qh, k, v)
        out = out.transpose(0, 2, 1, 3).reshape(bk, rows, d)
        lse = lse.transpose(0, 2, 1).reshape(bk, rows)
        return out.astype(jnp.float32), lse.astype(jnp.float32)


SPLASH = SplashKernel()
