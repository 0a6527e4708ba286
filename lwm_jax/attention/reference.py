"""Dense softmax attention: the oracle every other attention implementation is tested against.

Materialises the full `[batch, kv_heads, group, q_seq, kv_seq]` score tensor in float32, so it is
only for tests and short sequences. Causality is decided by positions (`q_pos >= k_pos`) and
packed documents by `segment_ids` (equal ids attend), which keeps it correct for any token order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_positions, k_positions, q_segment_ids, k_segment_ids, causal: bool):
    """Boolean mask `[batch, q_seq, kv_seq]`: True where a query may attend a key."""
    mask = jnp.ones((q_positions.shape[0], q_positions.shape[1], k_positions.shape[1]), bool)
    if causal:
        mask &= q_positions[:, :, None] >= k_positions[:, None, :]
    if q_segment_ids is not None:
        mask &= q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
    return mask


def reference_attention(q, k, v, *, segment_ids=None, positions=None, causal: bool = True):
    """Returns `[batch, seq, q_heads, head_dim]` in `q.dtype`.

    `q: [batch, seq, q_heads, head_dim]`, `k, v: [batch, seq, kv_heads, head_dim]`,
    `segment_ids, positions: [batch, seq]` (positions default to 0..seq-1).
    """
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    qg = q.reshape(batch, seq, kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(head_dim))
    mask = attention_mask(positions, positions, segment_ids, segment_ids, causal)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None, None], probs, 0.0)  # rows with no visible key give zeros
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(batch, seq, q_heads, head_dim).astype(q.dtype)
