"""The token lookup on the embedding table's own shards, so neither the table nor its float32
gradient is ever gathered whole (2.1 GB for Llama-3's `[128256, 4096]`).

The table is `[vocab, embed]` with vocab over `tp` and embed over `(fsdp, sp, ulysses)` (the logical
rules). Inside a `shard_map` each device all-gathers the (int) tokens of its `(fsdp, sp, ulysses)`
group, looks up its own columns of its own vocab rows for all of them, sums the vocab shards over
`tp` (the one reduction), and an all-to-all hands every device its own tokens with every column. The gradient
runs the same way back and lands as a scatter-add into the local shard.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from lwm_jax.parallel.mesh import logical_to_spec, spec_axes


def _local_lookup(table, tokens, *, vocab_axis, token_axes, dtype):
    """Per device: `table [V/tp, D/G]`, `tokens [b, s]` (its own) -> `[b, s, D]`."""
    for axis, dim in token_axes:  # every token of the (fsdp, sp, ulysses) group (any order the way back undoes)
        tokens = lax.all_gather(tokens, axis, axis=dim, tiled=True)
    rows = table.shape[0]
    offset = lax.axis_index(vocab_axis) * rows if vocab_axis else 0
    local = tokens - offset
    mine = (local >= 0) & (local < rows)
    x = jnp.take(table, jnp.clip(local, 0, rows - 1), axis=0).astype(dtype)
    x = jnp.where(mine[..., None], x, jnp.zeros((), dtype))
    if vocab_axis:
        x = lax.psum(x, vocab_axis)
    for axis, dim in reversed(token_axes):  # own tokens back; columns concatenate minor axis first
        x = _tokens_to_columns(x, axis, dim)
    return x


def _tokens_to_columns(x, axis, dim):
    """`[b, s, d]` holding every token of `axis` (along `dim`) and this device's `d` columns -> its
    own tokens with the columns of every device of `axis`. The all-to-all splits a leading axis of
    whole chunks: split in place, the token axis has XLA:TPU relayout the operand with reshapes
    whose compiled code grows with the sequence (1.1 GB of it at 524K tokens on v5p-8)."""
    n = lax.axis_size(axis)
    b, s, d = x.shape
    shape = (b, n, s // n, d) if dim == 1 else (n, b // n, s, d)
    x = lax.all_to_all(x.reshape(shape), axis, split_axis=dim, concat_axis=dim, tiled=True)
    x = jnp.moveaxis(x, dim, 2)
    return x.reshape(x.shape[0], x.shape[1], -1)


def embed_lookup(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """`table[tokens]` as `[batch, seq, embed]` in `dtype`, on the table's own shards under the
    current mesh (a plain gather without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return jnp.take(table, tokens, axis=0).astype(dtype)
    table_spec = logical_to_spec(("vocab", "embed"), mesh)
    token_spec = logical_to_spec(("batch", "length"), mesh)
    vocab_axes, group = spec_axes(table_spec[0]), spec_axes(table_spec[1])
    if len(vocab_axes) > 1:
        raise ValueError(f"the sharded lookup expects the vocab over at most one axis, got {vocab_axes}")
    batch_axes, length_axes = spec_axes(token_spec[0]), spec_axes(token_spec[1])
    # The group's axes in the table's column order (major first), each with the token dimension it
    # shards. The all-to-all runs minor axis first, so the columns come back in the table's order.
    token_axes = []
    for axis in group:
        if axis in length_axes:
            token_axes.append((axis, 1))
        elif axis in batch_axes:
            token_axes.append((axis, 0))
        else:
            raise ValueError(f"embed axis {axis!r} shards neither the batch nor the sequence")
    out_spec = P(token_spec[0], token_spec[1], None)
    fn = functools.partial(_local_lookup, vocab_axis=vocab_axes[0] if vocab_axes else None,
                           token_axes=tuple(token_axes), dtype=dtype)
    return jax.shard_map(fn, mesh=mesh, in_specs=(table_spec, token_spec), out_specs=out_spec)(table, tokens)
