"""Choosing the next token from the logits: greedy (argmax) or a sample from the top-p mass at a
temperature, with the checks of those settings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lwm_jax.errors import UserError


def check_sampling(greedy: bool, temperature: float, top_p: float) -> None:
    if not greedy and not (temperature > 0 and 0 < top_p <= 1):
        raise UserError(f"sampling needs --temperature > 0 and 0 < --top-p <= 1 (got {temperature}, {top_p})")


def pick_token(logits, key, greedy: bool, temperature, top_p):
    """Next token `[batch]` from float32 logits `[batch, vocab]`: argmax, or a top-p sample at
    `temperature` (both traced scalars, so changing them does not recompile)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    kept = ((jnp.cumsum(probs, axis=-1) - probs) < top_p) | (top_p >= 1.0)  # smallest prefix reaching top_p
    cutoff = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
