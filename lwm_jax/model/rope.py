"""Rotary position embedding (Hugging Face `rotate_half` convention) and the RoPE-theta formulas.

Angles are computed from positions on the fly, exactly enough for multi-million-token contexts:
`pos * inv_freq` in float32 is off by up to 0.06 rad at 1M positions, so the angle is formed in
32.64-bit fixed-point turns (integer arithmetic, wrapping mod one turn) and only the final
fraction of a turn is converted to float32 (error ~1e-6 rad at any position below 2^32).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lwm_jax.config import ModelConfig, RopeScaling

THETA_METHODS = ("scaling-law", "ntk")


def scaling_law_theta(context: int, base: float = 500_000.0, orig_context: int = 8192) -> float:
    """Liu et al. 2023 critical-dimension rule `b ** (ln(L/2π) / ln(L0/2π))` (Gradient's values)."""
    return base ** (math.log(context / (2 * math.pi)) / math.log(orig_context / (2 * math.pi)))


def ntk_theta(context: int, base: float = 500_000.0, head_dim: int = 128, orig_context: int = 8192) -> float:
    """NTK-aware scaling `b * (L/L0) ** (d/(d-2))`."""
    return base * (context / orig_context) ** (head_dim / (head_dim - 2))


def theta_for(method: str, context: int, base: float, head_dim: int, orig_context: int) -> float:
    if method == "scaling-law":
        return scaling_law_theta(context, base, orig_context)
    if method == "ntk":
        return ntk_theta(context, base, head_dim, orig_context)
    raise ValueError(f"unknown theta method {method!r} (valid: {', '.join(THETA_METHODS)})")


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Float64 inverse frequencies `[head_dim // 2]`, with Llama-3.1 `llama3` scaling if given."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(middle, smoothed, out)


def _mulhi_u32(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """High 32 bits of the 64-bit product of two uint32 arrays (to within 2 units)."""
    mask = jnp.uint32(0xFFFF)
    a_hi, a_lo = a >> 16, a & mask
    b_hi, b_lo = b >> 16, b & mask
    return a_hi * b_hi + ((a_hi * b_lo) >> 16) + ((a_lo * b_hi) >> 16)


def rope_angles(positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """Angles `[..., head_dim // 2]` in [0, 2π) (float32) for integer `positions` `[...]`."""
    turns = np.asarray(inv_freq, np.float64) / (2 * math.pi)
    scaled = np.floor(turns * 2.0**64)
    hi = np.floor(scaled / 2.0**32)
    words_hi = jnp.asarray(hi.astype(np.uint64).astype(np.uint32))
    words_lo = jnp.asarray((scaled - hi * 2.0**32).astype(np.uint64).astype(np.uint32))
    pos = positions.astype(jnp.uint32)[..., None]
    frac = pos * words_hi + _mulhi_u32(pos, words_lo)  # wraps mod 2^32: whole turns drop out
    return frac.astype(jnp.float32) * np.float32(2 * math.pi / 2.0**32)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """Rotates `x: [batch, seq, heads, head_dim]` by `positions: [batch, seq]`."""
    angles = rope_angles(positions, inv_freq)  # [batch, seq, head_dim // 2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def model_inv_frequencies(config: ModelConfig) -> np.ndarray:
    return inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
