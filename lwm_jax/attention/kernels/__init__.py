"""Per-block attention kernels behind one small interface, one per platform.

A kernel computes one *chunk pair* (a span of query rows against a span of keys) in the rows
layout below and returns the normalised output and its float32 log-sum-exp; `blockwise` and `ring`
merge chunk pairs through the log-sum-exp. `xla` (pure JAX) runs everywhere and is the reference
for the fused kernels. A chunk pair's backward must recompute its probabilities from the *global*
(merged) output and log-sum-exp, not from its own: a fused kernel's own VJP does not see the merge.
`Kernel.backward` does that with the pure-JAX blocks unless a kernel can feed its fused backward
the global statistics.

Rows layout (GQA without repeating K/V): queries `[batch*kv_heads, positions*group, head_dim]`
(row `s*group + g` is query head `kv*group + g` at position `s`), keys and values
`[batch*kv_heads, positions, head_dim]`, so each block product is one 3-D `dot_general` with the
KV heads as batch dimension.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lwm_jax.errors import UserError

# A row that sees no key gets this log-sum-exp: finite, so merges give it weight exp(-1e30) = 0
# without the NaN that -inf - -inf would produce.
LSE_EMPTY = -1e30


class Meta(NamedTuple):
    """Positions and segment ids of a chunk pair (segments None: one document)."""

    q_pos: jax.Array  # [batch*kv_heads, q_rows]
    q_seg: jax.Array | None
    k_pos: jax.Array  # [batch*kv_heads, kv_len]
    k_seg: jax.Array | None

    def slice(self, q_start, q_size, k_start, k_size) -> Meta:
        """The metadata of a sub-pair: rows `[q_start, +q_size)`, keys `[k_start, +k_size)`."""
        q = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(x, q_start, q_size, 1)
        k = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(x, k_start, k_size, 1)
        return Meta(q(self.q_pos), q(self.q_seg), k(self.k_pos), k(self.k_seg))


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static shape facts of a call: query heads per KV head, block length (positions), scale."""

    group: int
    block: int
    scale: float


# Layout helpers --------------------------------------------------------------------------------


def q_to_rows(q: jax.Array, kv_heads: int) -> jax.Array:
    """`[batch, seq, q_heads, head_dim]` -> `[batch*kv_heads, seq*group, head_dim]`."""
    b, s, h, d = q.shape
    g = h // kv_heads
    return q.reshape(b, s, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b * kv_heads, s * g, d)


def rows_to_q(x: jax.Array, batch: int, q_heads: int) -> jax.Array:
    """Inverse of `q_to_rows`."""
    bk, rows, d = x.shape
    kv_heads = bk // batch
    g = q_heads // kv_heads
    return x.reshape(batch, kv_heads, rows // g, g, d).transpose(0, 2, 1, 3, 4).reshape(
        batch, rows // g, q_heads, d)


def kv_to_rows(x: jax.Array) -> jax.Array:
    """`[batch, seq, kv_heads, head_dim]` -> `[batch*kv_heads, seq, head_dim]`."""
    b, s, k, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * k, s, d)


def rows_to_kv(x: jax.Array, batch: int) -> jax.Array:
    """Inverse of `kv_to_rows`."""
    bk, s, d = x.shape
    return x.reshape(batch, bk // batch, s, d).transpose(0, 2, 1, 3)


def ids_to_rows(ids: jax.Array | None, kv_heads: int, group: int) -> jax.Array | None:
    """Per-token ids `[batch, seq]` -> per-query-row ids `[batch*kv_heads, seq*group]`."""
    if ids is None:
        return None
    b, s = ids.shape
    return jnp.broadcast_to(ids[:, None, :, None], (b, kv_heads, s, group)).reshape(b * kv_heads, s * group)


def ids_to_kv(ids: jax.Array | None, kv_heads: int) -> jax.Array | None:
    """Per-token ids `[batch, seq]` -> per-key ids `[batch*kv_heads, seq]`."""
    if ids is None:
        return None
    b, s = ids.shape
    return jnp.broadcast_to(ids[:, None, :], (b, kv_heads, s)).reshape(b * kv_heads, s)


# The interface ---------------------------------------------------------------------------------


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
        from lwm_jax.attention.kernels import xla

        delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        return xla.chunk_backward(q, k, v, dout, xla.backward_lse(lse), delta, meta, tiling, causal=causal)

    def attention(self, q, k, v, *, causal: bool):
        """Whole single-device attention `[batch, seq, heads, dim]` with the kernel's own VJP,
        for calls that merge nothing (no segments); None when the kernel has no such path."""
        return None

    def __repr__(self):
        return f"<attention kernel {self.name}>"


_KERNELS: dict[str, Kernel] = {}
# Tried in this order by `kernel="auto"` on each platform; `xla` is always the last resort.
_AUTO: dict[str, tuple[str, ...]] = {"gpu": ("cudnn",), "tpu": ()}


def register(kernel: Kernel) -> Kernel:
    _KERNELS[kernel.name] = kernel
    return kernel


def kernel_names() -> tuple[str, ...]:
    _load_builtin()
    return tuple(_KERNELS)


def get_kernel(name: str) -> Kernel:
    _load_builtin()
    if name not in _KERNELS:
        raise UserError(f"attention kernel={name!r} is not one of {('auto',) + tuple(_KERNELS)}")
    return _KERNELS[name]


def select_kernel(name: str, *, dtype, head_dim: int, segments: bool,
                  platform: str | None = None) -> Kernel:
    """The kernel for a call: `auto` picks the platform's fused kernel when it supports the call
    (else `xla`); a named kernel that cannot run the call is an error."""
    _load_builtin()
    platform = platform or jax.default_backend()
    if name == "auto":
        for candidate in _AUTO.get(platform, ()):
            kernel = _KERNELS.get(candidate)
            if kernel is not None and platform in kernel.platforms and kernel.supports(
                    dtype=dtype, head_dim=head_dim, segments=segments) is None:
                return kernel
        return _KERNELS["xla"]
    kernel = get_kernel(name)
    if kernel.platforms and platform not in kernel.platforms:
        raise UserError(f"attention kernel={name!r} runs on {'/'.join(kernel.platforms)}, "
                        f"not on {platform}; use kernel='auto' or 'xla'")
    why = kernel.supports(dtype=dtype, head_dim=head_dim, segments=segments)
    if why is not None:
        raise UserError(f"attention kernel={name!r} cannot run this call: {why}")
    return kernel


def _load_builtin() -> None:
    """Imports the built-in kernels, which register themselves (the imports are cached)."""
    from lwm_jax.attention.kernels import cudnn, splash, xla  # noqa: F401
