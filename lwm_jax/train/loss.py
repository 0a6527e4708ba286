"""Cross-entropy computed in sequence chunks, so `[seq, vocab]` logits are never materialised.

At 1M tokens x 128,256 vocab the full logits would be 256 GB in bf16. The loss scans over
sequence chunks; each chunk's logits live only inside a rematerialised scan body, so the backward
pass recomputes them chunk by chunk too.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from lwm_jax.parallel.mesh import (
    HEADS_AXIS,
    SEQ_AXES,
    WEIGHT_AXES,
    constrain,
    current_axis_sizes,
    logical_to_spec,
    seq_shards,
    spec_axes,
)


def chunked_cross_entropy(hidden, out_weights, targets, loss_weights, chunk_size: int = 2048):
    """Returns `(nll_sum, weight_sum)`: the loss-weighted sum of token NLLs and of the weights.

    `hidden: [batch, seq, embed]`, `out_weights: [embed, vocab]`, `targets: [batch, seq]` int,
    `loss_weights: [batch, seq]` float. Each scan step takes `chunk_size` tokens spread evenly over
    the sequence shards (`sp * ulysses`), so every device forms float32 logits for only
    `chunk_size / shards` of its own tokens at a time and nothing is resharded.
    """
    batch, seq, embed = hidden.shape
    shards = seq_shards(jax.sharding.get_abstract_mesh())
    if seq % shards:
        shards = 1
    local = seq // shards
    chunk = max(1, min(chunk_size // shards, local))
    pad = (-local) % chunk

    def to_chunks(x):  # [batch, seq, ...] -> [n, batch, shards, chunk, ...], shards on sp, ulysses
        x = x.reshape(batch, shards, local, *x.shape[2:])
        if pad:
            x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        x = x.reshape(batch, shards, (local + pad) // chunk, chunk, *x.shape[3:])
        x = jnp.moveaxis(x, 2, 0)
        return constrain(x, (None, "batch", "length", None) + (None,) * (x.ndim - 4))

    @jax.checkpoint
    def chunk_nll(h, t, w):
        logits = jnp.einsum("bgsd,dv->bgsv", h, out_weights.astype(h.dtype),
                            preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - target_logit) * w)

    def body(total, xs):
        return total + chunk_nll(*xs), None

    weights = loss_weights.astype(jnp.float32)
    nll, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (to_chunks(hidden), to_chunks(targets), to_chunks(weights)))
    return nll, jnp.sum(weights)


def _group_nll(h, t, w, weights, *, group, gather_axes, chunk):
    """Per device, inside `shard_map`: the loss-weighted NLL sum of its own tokens `[b, s]`, with
    logits only for its slice of the vocabulary, `w: [embed, vocab / N]`, and every token of its
    `gather_axes` group (so each device computes 1/N of every group token's logits)."""
    b, s, _ = h.shape
    n = s // chunk
    index = 0
    for axis in group:  # this device's vocab slice: its linear index over the group, major first
        index = index * lax.axis_size(axis) + lax.axis_index(axis)
    offset = index * w.shape[1]

    def gather(x):  # the whole group's tokens of this chunk, in index order
        for axis, dim in gather_axes:
            x = lax.all_gather(x, axis, axis=dim, tiled=True)
        return x

    def own(x):  # this device's block of a group array
        for axis, dim in reversed(gather_axes):
            size = x.shape[dim] // lax.axis_size(axis)
            x = lax.dynamic_slice_in_dim(x, lax.axis_index(axis) * size, size, dim)
        return x

    @jax.checkpoint
    def chunk_nll(hc, tc, wc):
        logits = jnp.einsum("bsd,dv->bsv", gather(hc), w.astype(hc.dtype), preferred_element_type=jnp.float32)
        top = lax.pmax(lax.stop_gradient(logits.max(axis=-1)), group)
        lse = top + jnp.log(lax.psum(jnp.exp(logits - top[..., None]).sum(axis=-1), group))
        local = gather(tc) - offset
        mine = (local >= 0) & (local < w.shape[1])
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, w.shape[1] - 1)[..., None], axis=-1)[..., 0]
        target = lax.psum(jnp.where(mine, picked, 0.0), group)
        return jnp.sum(own(lse - target) * wc)

    def body(total, xs):
        return total + chunk_nll(*xs), None

    split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
    start = jnp.sum(weights[:, :0])  # zero, varying over the same mesh axes as the sums it starts
    total, _ = lax.scan(body, start, (split(h), split(t), split(weights)))
    return total.reshape(1, 1)


def vocab_parallel_cross_entropy(hidden, out_weights, targets, loss_weights, chunk_size: int = 2048):
    """`chunked_cross_entropy` with the output projection split by vocabulary over the devices that
    shard the weights (`fsdp, sp, ulysses, tp`) instead of gathered whole: each device holds `[embed, vocab/N]`
    (resharded once per step, float32 so its gradient accumulates in float32), gathers the hidden
    states of its group chunk by chunk and computes its share of every group token's logits; the
    softmax statistics meet through `pmax`/`psum`. No device ever holds the `[embed, vocab]` matrix
    or its gradient (2 x 2.1 GB for Llama-3). Falls back to `chunked_cross_entropy` where the mesh
    does not shard the weights or the vocabulary does not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    batch, seq, _ = hidden.shape
    vocab = out_weights.shape[1]
    sizes = current_axis_sizes()
    group = tuple(a for a in (*WEIGHT_AXES, HEADS_AXIS) if sizes[a] > 1)
    ways = math.prod(sizes[a] for a in group)
    token_spec = logical_to_spec(("batch", "length"), mesh) if group else None
    batch_axes = spec_axes(token_spec[0]) if group else ()
    shards = math.prod(sizes[a] for a in SEQ_AXES)
    local = seq // shards
    chunk = max(1, min(chunk_size // shards, local))
    if not group or vocab % ways or seq % shards or local % chunk:
        return chunked_cross_entropy(hidden, out_weights, targets, loss_weights, chunk_size)
    gather_axes = tuple((a, 0 if a in batch_axes else 1) for a in WEIGHT_AXES if a in group)
    w = jax.lax.with_sharding_constraint(out_weights, P(None, group))
    weights = loss_weights.astype(jnp.float32)
    fn = functools.partial(_group_nll, group=group, gather_axes=gather_axes, chunk=chunk)
    spec3 = P(token_spec[0], token_spec[1], None)
    sums = jax.shard_map(fn, mesh=mesh, in_specs=(spec3, token_spec, P(None, group), token_spec),
                         out_specs=P(token_spec[0], token_spec[1]))(hidden, targets, w, weights)
    return jnp.sum(sums), jnp.sum(weights)
