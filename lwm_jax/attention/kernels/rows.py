"""The data every attention kernel shares: the rows layout, a chunk pair's metadata and tiling.

A kernel computes one *chunk pair* (a span of query rows against a span of keys) in the rows
layout below and returns the normalised output and its float32 log-sum-exp; `blockwise` and `ring`
merge chunk pairs through the log-sum-exp. `xla` (pure JAX) runs everywhere and is the reference
for the fused kernels. A chunk pair's backward must recompute its probabilities from the *global*
(merged) output and log-sum-exp, not from its own: a fused kernel's own VJP does not see the merge.
`XlaKernel.backward` does that with the pure-JAX blocks; a fused kernel overrides it only when it
can feed its fused backward the global statistics.

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
