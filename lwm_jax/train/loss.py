"""Cross-entropy computed in sequence chunks, so `[seq, vocab]` logits are never materialised.

At 1M tokens x 128,256 vocab the full logits would be 256 GB in bf16. The loss scans over
sequence chunks; each chunk's logits live only inside a rematerialised scan body, so the backward
pass recomputes them chunk by chunk too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lwm_jax.parallel.mesh import constrain


def _sequence_shards() -> int:
    """How many ways the sequence axis is sharded under the current mesh (its `sp` size)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or "sp" not in mesh.axis_names else mesh.shape["sp"]


def chunked_cross_entropy(hidden, out_weights, targets, loss_weights, chunk_size: int = 2048):
    """Returns `(nll_sum, weight_sum)`: the loss-weighted sum of token NLLs and of the weights.

    `hidden: [batch, seq, embed]`, `out_weights: [embed, vocab]`, `targets: [batch, seq]` int,
    `loss_weights: [batch, seq]` float. Each scan step takes `chunk_size` tokens spread evenly over
    the sequence shards (`sp`), so every device forms float32 logits for only
    `chunk_size / sp` of its own tokens at a time and nothing is resharded.
    """
    batch, seq, embed = hidden.shape
    shards = _sequence_shards()
    if seq % shards:
        shards = 1
    local = seq // shards
    chunk = max(1, min(chunk_size // shards, local))
    pad = (-local) % chunk

    def to_chunks(x):  # [batch, seq, ...] -> [n, batch, shards, chunk, ...], shards on sp
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
