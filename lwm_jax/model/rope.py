"""Rotary position embedding (Hugging Face `rotate_half` convention), its scaling methods and the
RoPE-theta formulas.

Angles are computed from positions on the fly, exactly enough for multi-million-token contexts:
`pos * inv_freq` in float32 is off by up to 0.06 rad at 1M positions, so the angle is formed in
32.64-bit fixed-point turns (integer arithmetic, wrapping mod one turn) and only the final
fraction of a turn is converted to float32 (error ~1e-6 rad at any position below 2^32). A scaling
method (`linear`, `yarn`, `llama3`, with transformers' formulas) changes only the float64 inverse
frequencies and, for YaRN, multiplies cos/sin by the attention factor, so every type stays precise.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax.numpy as jnp
import numpy as np

from lwm_jax.config import ModelConfig, RopeScaling
from lwm_jax.errors import UserError

THETA_METHODS = ("scaling-law", "ntk")
_LOG_FLOAT_MAX = math.log(sys.float_info.max)  # 709.78: ln of the largest float64
SCALING_LAW_DOMAIN = ("b > 1, L > 2π and L0 > 2π (2π ≈ 6.283; ln(L0/2π) is 0 at L0 = 2π and negative below), "
                      "with ln(theta) = ln(b)·ln(L/2π)/ln(L0/2π) ≤ 709.78 (the float64 range)")
NTK_DOMAIN = "b > 1, L > 0, L0 > 0 and an even head dim d > 2, with 0 < ln(theta) = ln(b) + d/(d-2)·ln(L/L0) ≤ 709.78"


def _first_problem(checks: list[tuple[bool, str]]) -> str | None:
    return next((problem for ok, problem in checks if not ok), None)


def scaling_law_theta(context: int, base: float = 500_000.0, orig_context: int = 8192) -> float:
    """Liu et al. 2023 critical-dimension rule `b ** (ln(L/2π) / ln(L0/2π))` (Gradient's values).

    A UserError outside its domain (SCALING_LAW_DOMAIN): below L0 = 2π the rule would lower theta as
    the context grows, below L = 2π it gives theta < 1, and L0 just above 2π overflows.
    """
    rule = f"the scaling-law rule b**(ln(L/2π)/ln(L0/2π)) is defined for {SCALING_LAW_DOMAIN}"
    problem = _first_problem([(base > 1, f"base b={base:g} is not > 1"),
                              (orig_context > 2 * math.pi, f"orig_context L0={orig_context} is not > 2π"),
                              (context > 2 * math.pi, f"context L={context} is not > 2π")])
    if problem:
        raise UserError(f"{problem}: {rule}")
    exponent = math.log(context / (2 * math.pi)) / math.log(orig_context / (2 * math.pi))
    if math.log(base) * exponent > _LOG_FLOAT_MAX:
        raise UserError(f"L={context:,}, L0={orig_context:,}, b={base:g} give theta = "
                        f"10**{math.log10(base) * exponent:,.0f}, past float64 (L0 is too close to 2π): {rule}")
    return base ** exponent


def ntk_theta(context: int, base: float = 500_000.0, head_dim: int = 128, orig_context: int = 8192) -> float:
    """NTK-aware scaling `b * (L/L0) ** (d/(d-2))`; a UserError outside its domain (NTK_DOMAIN)."""
    rule = f"the NTK rule b*(L/L0)**(d/(d-2)) is defined for {NTK_DOMAIN}"
    problem = _first_problem([(base > 1, f"base b={base:g} is not > 1"),
                              (context > 0, f"context L={context} is not > 0"),
                              (orig_context > 0, f"orig_context L0={orig_context} is not > 0"),
                              (head_dim > 2 and head_dim % 2 == 0, f"head_dim d={head_dim} is not even and > 2")])
    if problem:
        raise UserError(f"{problem}: {rule}")
    log_theta = math.log(base) + head_dim / (head_dim - 2) * math.log(context / orig_context)
    if not 0 < log_theta <= _LOG_FLOAT_MAX:
        raise UserError(f"L={context:,}, L0={orig_context:,}, b={base:g}, d={head_dim} give theta = "
                        f"e**{log_theta:,.1f}, {'not > 1' if log_theta <= 0 else 'past float64'}: {rule}")
    return base * (context / orig_context) ** (head_dim / (head_dim - 2))


def theta_for(method: str, context: int, base: float, head_dim: int, orig_context: int) -> float:
    """The theta of rule `method` (THETA_METHODS); a UserError outside the rule's domain."""
    if method == "scaling-law":
        return scaling_law_theta(context, base, orig_context)
    if method == "ntk":
        return ntk_theta(context, base, head_dim, orig_context)
    raise ValueError(f"unknown theta method {method!r} (valid: {', '.join(THETA_METHODS)})")


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Float64 inverse frequencies `[head_dim // 2]` under `scaling` (transformers' formulas)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "yarn":
        return _yarn_inv_frequencies(inv_freq, head_dim, theta, scaling)
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(middle, smoothed, out)


def _yarn_inv_frequencies(inv_freq: np.ndarray, head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """YaRN (Peng et al. 2023): frequency i is extrapolated (kept) below the dimension that turns
    `beta_fast` times within `original_max_position_embeddings`, interpolated (divided by `factor`)
    above the one that turns `beta_slow` times, linearly ramped between."""
    beta_fast, beta_slow = scaling.beta_fast or 32.0, scaling.beta_slow or 1.0  # transformers: `or` defaults

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.truncate is not False:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp
    return inv_freq / scaling.factor * (1.0 - extrapolation) + inv_freq * extrapolation


def attention_factor(scaling: RopeScaling | None) -> float:
    """The factor cos and sin are multiplied by: YaRN's `attention_factor`, else from `mscale` and
    `mscale_all_dim` when both are set, else `0.1 ln(factor) + 1`; 1 for every other type."""
    if scaling is None or scaling.rope_type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return mscale(scaling.factor, scaling.mscale) / mscale(scaling.factor, scaling.mscale_all_dim)
    return mscale(scaling.factor)


def length_temperature(length: int, trained: int) -> float:
    """The cos/sin factor of the log-n attention temperature: attention logits times
    ln(length) / ln(trained) past the trained length, 1 within it. A query's softmax over n keys
    flattens as n grows; scaling its logits by ln n keeps it as sharp as at the trained length
    (Chiang & Cholak 2022; YaRN's 0.1 ln(s) + 1 on cos/sin is a fit of the same)."""
    if trained < 2 or length < 1:
        raise UserError(f"length={length} must be >= 1 and trained={trained} >= 2")
    return math.sqrt(max(1.0, math.log(length) / math.log(trained)))


def with_attention_temperature(config: ModelConfig, scale: float) -> ModelConfig:
    """`config` with cos/sin multiplied by `scale` more (attention logits by `scale` squared), the
    frequencies unchanged: YaRN's attention factor alone (factor 1) for RoPE without scaling, a YaRN
    model's own attention factor times `scale`; a UserError for the other scaling types."""
    if not (scale > 0 and math.isfinite(scale)):
        raise UserError(f"attention temperature scale={scale} must be a positive number")
    scaling = config.rope_scaling
    if scale == 1.0:
        return config
    if scaling is None:
        return config.replace(rope_scaling=RopeScaling(rope_type="yarn", factor=1.0, attention_factor=scale,
                                                       original_max_position_embeddings=config.max_position_embeddings))
    if scaling.rope_type == "yarn":
        factor = attention_factor(scaling) * scale
        return config.replace(rope_scaling=dataclasses.replace(scaling, attention_factor=factor))
    raise UserError(f"an attention temperature needs RoPE without scaling or with YaRN, not rope_type "
                    f"{scaling.rope_type!r}")


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


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray, scale: float = 1.0) -> jnp.ndarray:
    """Rotates `x: [batch, seq, heads, head_dim]` by `positions: [batch, seq]` (cos/sin times `scale`)."""
    angles = rope_angles(positions, inv_freq)  # [batch, seq, head_dim // 2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:
        cos, sin = cos * np.float32(scale), sin * np.float32(scale)
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def model_inv_frequencies(config: ModelConfig) -> np.ndarray:
    return inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)


def model_rope_scale(config: ModelConfig) -> float:
    """The factor a model's cos/sin are multiplied by (YaRN's attention factor; else 1)."""
    return attention_factor(config.rope_scaling)
