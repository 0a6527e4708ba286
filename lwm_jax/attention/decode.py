"""Attention of one new token over a sequence-sharded KV cache (flash-decoding).

The cache `[layers, batch, cache_len, kv_heads, head_dim]` is kept in natural token order, sharded
along the sequence over the length axes `sp` and `ulysses` (sp major, as the prefill's activations;
over `tp` along the heads). A decode step writes the new key and value on the device that owns its
position, lets every device attend the query over its own slice (partial max, sum and weighted
values) and combines the partials across the length axes through their log-sum-exp: only
`[batch, heads, head_dim]` partials travel, never the cache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lwm_jax.attention.reference import MASK_VALUE
from lwm_jax.parallel.mesh import BATCH_AXES, HEADS_AXIS, SEQ_AXES, axis_sizes


@functools.partial(jax.tree_util.register_dataclass, data_fields=("k", "v", "pos"), meta_fields=("mesh",))
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The stacked cache `k, v: [layers, batch, cache_len, kv_heads, head_dim]`, the position `pos`
    (int32 scalar) the next token is written at, and the mesh it is sharded on (None: one device)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    mesh: Any = None

    def at(self, pos) -> KVCache:
        return dataclasses.replace(self, pos=jnp.asarray(pos, jnp.int32))


def cache_specs(mesh):
    """PartitionSpecs of the one-token `q/k/v` and of the stacked cache on `mesh`."""
    names = mesh.axis_names
    batch = tuple(a for a in BATCH_AXES if a in names) or None
    heads = HEADS_AXIS if HEADS_AXIS in names else None
    return P(batch, None, heads, None), P(None, batch, _length_axes(mesh), heads, None)


def _length_axes(mesh) -> tuple[str, ...] | None:
    """The mesh's length axes of size > 1, sp major (None: the cache is not sharded along it)."""
    return tuple(a for a in SEQ_AXES if axis_sizes(mesh)[a] > 1) or None


def shard_cache(k, v, pos, mesh) -> KVCache:
    """A `KVCache` from natural-order `k, v` (constrained to the cache sharding when `mesh` is given)."""
    if mesh is not None:
        sharding = NamedSharding(mesh, cache_specs(mesh)[1])
        k, v = lax.with_sharding_constraint(k, sharding), lax.with_sharding_constraint(v, sharding)
    return KVCache(k, v, jnp.asarray(pos, jnp.int32), mesh)


def _local_decode(q, k_new, v_new, cache_k, cache_v, layer, pos, *, axis):
    """One device's part of a decode step on layer `layer` of the stacked cache: writes `k_new,
    v_new` at `pos` if this device owns it (one row, in place), attends `q` over the local slice
    and combines the partial softmaxes over `axis` (if any).

    `q: [b, 1, q_heads, d]`, `k_new, v_new: [b, 1, kv_heads, d]`, caches `[layers, b, local, kv_heads, d]`.
    """
    local = cache_k.shape[2]
    start = lax.axis_index(axis) * local if axis else 0  # a tuple of axes: the linear index, major first
    offset = pos - start
    mine = (offset >= 0) & (offset < local)
    slot = jnp.clip(offset, 0, local - 1)
    zero = jnp.int32(0)
    corner = (layer, zero, slot, zero, zero)

    def write(cache, new):
        old = lax.dynamic_slice(cache, corner, (1, *new.shape))
        return lax.dynamic_update_slice(cache, jnp.where(mine, new[None].astype(cache.dtype), old), corner)

    cache_k, cache_v = write(cache_k, k_new), write(cache_v, v_new)
    keys = lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False)
    values = lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False)
    b, _, q_heads, d = q.shape
    kv_heads = keys.shape[2]
    qg = q.reshape(b, kv_heads, q_heads // kv_heads, d).astype(jnp.float32)
    scores = jnp.einsum("bkgd,btkd->bkgt", qg, keys.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(d))
    visible = (start + jnp.arange(local)) <= pos  # [local]
    scores = jnp.where(visible, scores, MASK_VALUE)
    top = scores.max(axis=-1)  # [b, kv, g]
    if axis:
        top = lax.pmax(top, axis)
    probs = jnp.where(visible, jnp.exp(scores - top[..., None]), 0.0)
    total = probs.sum(axis=-1)
    out = jnp.einsum("bkgt,btkd->bkgd", probs, values.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    if axis:
        total, out = lax.psum((total, out), axis)
    out = (out / total[..., None]).reshape(b, 1, q_heads, d).astype(q.dtype)
    return out, cache_k, cache_v


def cache_attention(q, k_new, v_new, cache: KVCache, layer) -> tuple[jax.Array, KVCache]:
    """`(out [b, 1, q_heads, d], cache)`: one decode step of layer `layer` at `cache.pos`, the new
    key and value written into the cache (flash-decoding over the length axes: the cache never moves)."""
    if cache.mesh is None:
        out, k, v = _local_decode(q, k_new, v_new, cache.k, cache.v, layer, cache.pos, axis=None)
    else:
        tok_spec, cache_spec = cache_specs(cache.mesh)
        out, k, v = jax.shard_map(
            functools.partial(_local_decode, axis=_length_axes(cache.mesh)), mesh=cache.mesh,
            in_specs=(tok_spec, tok_spec, tok_spec, cache_spec, cache_spec, P(), P()),
            out_specs=(tok_spec, cache_spec, cache_spec), check_vma=False)(
                q, k_new, v_new, cache.k, cache.v, layer, cache.pos)
    return out, dataclasses.replace(cache, k=k, v=v)
