"""Cross-entropy computed in sequence chunks, so `[seq, vocab]` logits are never materialised.

At 1M tokens x 128,256 vocab the full logits would be 256 GB in bf16. The loss scans over
sequence chunks; each chunk's logits live only inside a rematerialised scan body, so the backward
pass recomputes them chunk by chunk too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_cross_entropy(hidden, out_weights, targets, loss_weights, chunk_size: int = 2048):
    """Returns `(nll_sum, weight_sum)`: the loss-weighted sum of token NLLs and of the weights.

    `hidden: [batch, seq, embed]`, `out_weights: [embed, vocab]`, `targets: [batch, seq]` int,
    `loss_weights: [batch, seq]` float. Logits are formed in float32 one chunk at a time.
    """
    batch, seq, embed = hidden.shape
    chunk = min(chunk_size, seq)
    pad = (-seq) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        loss_weights = jnp.pad(loss_weights, ((0, 0), (0, pad)))
    n = (seq + pad) // chunk

    def to_chunks(x):  # [batch, n * chunk, ...] -> [n, batch, chunk, ...]
        return jnp.moveaxis(x.reshape(batch, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_nll(h, t, w):
        logits = jnp.einsum("bsd,dv->bsv", h, out_weights.astype(h.dtype),
                            preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - target_logit) * w)

    def body(total, xs):
        return total + chunk_nll(*xs), None

    nll, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (to_chunks(hidden), to_chunks(targets), to_chunks(loss_weights.astype(jnp.float32))))
    return nll, jnp.sum(loss_weights.astype(jnp.float32))
