"""RoPE angles against a float64 oracle, theta formulas against Gradient's published values, and
Llama-3.1 `llama3` frequency scaling against transformers."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lwm_jax.config import RopeScaling
from lwm_jax.model.rope import apply_rope, inv_frequencies, ntk_theta, rope_angles, scaling_law_theta

ANGLE_TOL = 1e-3  # rad, mod 2pi: the plain float32 pos*inv_freq is off by ~0.03 rad at 2^20, ~0.08 at 2^22
OP_TOL = 1e-5


def _wrapped_error(a, b):
    return np.abs(np.angle(np.exp(1j * (np.asarray(a, np.float64) - b))))


@pytest.mark.parametrize("position", [1_048_575, 4_194_303])
def test_angles_precise_at_long_positions(position):
    inv_freq = inv_frequencies(128, 3_580_165_449.0)
    exact = np.mod(position * inv_freq, 2 * math.pi)
    ours = np.asarray(rope_angles(jnp.asarray([position]), inv_freq))[0]
    assert _wrapped_error(ours, exact).max() <= ANGLE_TOL
    naive = np.asarray(jnp.float32(position) * jnp.asarray(inv_freq, jnp.float32))
    assert _wrapped_error(naive, exact).max() > ANGLE_TOL  # the plain float32 product is not enough


def test_angles_exact_for_all_short_positions():
    inv_freq = inv_frequencies(64, 500_000.0)
    pos = np.arange(0, 70_000, 7)
    ours = np.asarray(rope_angles(jnp.asarray(pos), inv_freq))
    assert _wrapped_error(ours, np.mod(pos[:, None] * inv_freq, 2 * math.pi)).max() <= 2e-6


@pytest.mark.parametrize("context,expected", [
    (65_536, 22_443_169), (262_144, 283_461_213), (524_288, 1_007_391_703),
    (1_048_576, 3_580_165_449), (4_194_304, 45_218_125_210)])
def test_scaling_law_theta(context, expected):
    assert abs(scaling_law_theta(context) - expected) <= 1


@pytest.mark.parametrize("context,expected", [(65_536, 4.13e6), (262_144, 16.9e6), (524_288, 34.2e6),
                                              (1_048_576, 69_123_823)])
def test_ntk_theta(context, expected):
    assert ntk_theta(context) == pytest.approx(expected, rel=3e-3)


def test_llama3_scaling_matches_transformers():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_theta=500_000.0,
                         rope_scaling=dict(scaling), max_position_embeddings=131_072)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = inv_frequencies(128, 500_000.0, RopeScaling(**scaling))
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=OP_TOL)


def test_apply_rope_matches_rotate_half_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    pos = np.stack([np.arange(5), np.arange(100, 105)]).astype(np.int32)
    inv = inv_frequencies(8, 10_000.0)
    ang = pos[..., None] * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, :, None], np.sin(np.concatenate([ang, ang], -1))[:, :, None]
    rot = np.concatenate([-x[..., 4:], x[..., :4]], -1)
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), inv)),
                               x * cos + rot * sin, atol=OP_TOL)
