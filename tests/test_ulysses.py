"""Ulysses (all-to-all over `ulysses`) composed with the zigzag ring over `sp`, against the dense
reference: attention outputs and gradients with packed documents (fewer KV heads than the axis,
the hybrid, with dp and with tp), the model's mean NLL through its loss path, greedy generation on a
ulysses x sp mesh, the layout's lengths, and the head counts the axis cannot split."""

from __future__ import annotations

import os

if "device_count" not in os.environ.get("XLA_FLAGS", ""):  # conftest.py normally does this
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lwm_jax.attention import attention
from lwm_jax.attention import kernels as K
from lwm_jax.attention.kernels.cudnn import CudnnKernel
from lwm_jax.attention.layout import (
    from_zigzag,
    layout_length,
    padded_length,
    place,
    ring_block,
    to_zigzag,
)
from lwm_jax.attention.reference import reference_attention
from lwm_jax.attention.ring import ring_attention
from lwm_jax.config import MeshConfig, ModelConfig
from lwm_jax.convert.hf import import_hf
from lwm_jax.errors import UserError
from lwm_jax.generate import generate
from lwm_jax.model.llama import Llama
from lwm_jax.model.store import merge_params
from lwm_jax.parallel.mesh import make_mesh, seq_shards
from lwm_jax.train.loss import chunked_cross_entropy, vocab_parallel_cross_entropy
from lwm_jax.train.step import param_shardings
from tests.conftest import make_hf_llama
from tests.test_attention import packed_documents

# Float32 attention (output, dq, dk, dv) with unit-scale inputs: the exchange only moves values,
# so the error is the ring's own float32 merge order (measured ~3e-6).
F32_ATOL = 1e-5
# The model's mean NLL: a mean of O(1) per-token NLLs, which differ from the single-device
# reference only in the order of float32 sums (measured <= 5e-7).
NLL_ATOL = 1e-5


def _mesh(**axes):
    config = MeshConfig(**axes)
    return make_mesh(config, devices=jax.devices()[:int(np.prod(config.shape))])


def _inputs(batch, seq, q_heads, kv_heads, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(batch, seq, q_heads, head_dim), (batch, seq, kv_heads, head_dim),
              (batch, seq, kv_heads, head_dim), (batch, seq, q_heads, head_dim)]
    return [jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in shapes]


def _out_and_grads(attn, q, k, v, dout):
    def loss(q, k, v):
        out = attn(q, k, v)
        return jnp.sum(out * dout), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


# Attention -------------------------------------------------------------------------------------

# id: mesh axes, batch, seq, q_heads, kv_heads, block_size
CASES = {
    "ulysses8-kv2": (dict(ulysses=8), 1, 64, 8, 2, 4),  # fewer KV heads than the axis
    "ulysses2-sp4": (dict(ulysses=2, sp=4), 1, 64, 4, 2, 4),  # the hybrid: KV heads split
    "dp2-ulysses4": (dict(dp=2, ulysses=4), 2, 64, 8, 2, 4),
    "ulysses2-sp2-tp2": (dict(ulysses=2, sp=2, tp=2), 1, 64, 8, 4, 4),
    "ulysses4-tp2-kv2": (dict(ulysses=4, tp=2), 1, 32, 8, 2, 8),  # one KV head per tp shard, 4 devices
}


@pytest.mark.parametrize("case", list(CASES))
def test_ulysses_ring_matches_reference(case):
    axes, batch, seq, q_heads, kv_heads, block_size = CASES[case]
    sp = axes.get("sp", 1)
    q, k, v, dout = _inputs(batch, seq, q_heads, kv_heads, 16)
    seg, pos = packed_documents(batch, seq)
    want = _out_and_grads(lambda q, k, v: reference_attention(q, k, v, segment_ids=seg, positions=pos), q, k, v, dout)
    z = lambda x: to_zigzag(x, sp)
    with jax.set_mesh(_mesh(**axes)):
        got = _out_and_grads(lambda q, k, v: attention(q, k, v, segment_ids=z(seg), positions=z(pos), impl="ring",
                                                       block_size=block_size), z(q), z(k), z(v), z(dout))
    for name, g, w in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (want[0], *want[1])):
        err = float(np.abs(np.asarray(from_zigzag(g, sp)) - np.asarray(w)).max())
        assert err <= F32_ATOL, f"{name}: max abs error {err:.3g} > {F32_ATOL}"


def test_ulysses_rejects_heads_it_cannot_split():
    q, k, v, _ = _inputs(1, 32, 6, 3, 8)
    with jax.set_mesh(_mesh(ulysses=4)):
        with pytest.raises(UserError, match=r"q_heads=6 must be divisible by tp\*ulysses=4"):
            ring_attention(q, k, v)
        q12 = jnp.concatenate([q, q], axis=2)  # 12 query heads over 4 devices, 3 KV heads: neither rule
        with pytest.raises(UserError, match=r"kv_heads/tp=3 .* must divide or be a multiple of ulysses=4"):
            ring_attention(q12, k, v)
        q, k, v, _ = _inputs(1, 34, 4, 1, 8)  # a ring length, but not one that splits over ulysses=4
        with pytest.raises(UserError, match=r"seq_len=34 must be divisible by sp\*ulysses=4 .*"
                                            r"nearest valid lengths are 32 or 36"):
            ring_attention(q, k, v)


def test_ulysses_without_a_ring_hands_the_whole_call_to_the_fused_kernel(monkeypatch):
    """sp=1, natural positions, no segments: after the exchange nothing is merged, so a kernel's
    whole-call path (cuDNN's own VJP on a GPU; here the same public call with XLA) runs, and agrees."""
    calls = []

    class Spy(CudnnKernel):
        def attention(self, q, k, v, *, causal):
            calls.append(q.shape)
            return super().attention(q, k, v, causal=causal)

    monkeypatch.setattr(K, "select_kernel", lambda *a, **kw: Spy(implementation="xla", platforms=()))
    q, k, v, dout = _inputs(1, 64, 8, 2, 16)
    want = _out_and_grads(lambda q, k, v: reference_attention(q, k, v), q, k, v, dout)
    with jax.set_mesh(_mesh(ulysses=8)):
        got = _out_and_grads(lambda q, k, v: ring_attention(q, k, v, block_size=4), q, k, v, dout)
    assert calls == [(1, 64, 1, 16)]  # one device's view: the whole sequence, its one query head
    for name, g, w in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (want[0], *want[1])):
        err = float(np.abs(np.asarray(g) - np.asarray(w)).max())
        assert err <= F32_ATOL, f"{name}: max abs error {err:.3g} > {F32_ATOL}"


# Model level -----------------------------------------------------------------------------------

MODEL = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8,
                    num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_id=(2,), attention="ring",
                    attention_block_size=4, remat="full")
SEQ, BATCH = 64, 2


def _mean_nll(config, mesh_spec, loss):
    """The mean NLL of a fixed packed batch through `model.hidden` and `loss` (None: one device)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, size=(BATCH, SEQ + 1)).astype(np.int32)
    weights = (rng.random((BATCH, SEQ)) < 0.8).astype(np.float32)
    seg, pos = packed_documents(BATCH, SEQ, seed=1)
    arrays = (tokens[:, :-1], pos, seg, tokens[:, 1:], weights)
    mesh = make_mesh(MeshConfig.parse(mesh_spec)) if mesh_spec else None

    def mean_nll(params, inputs, positions, segments, targets, weights):
        model = merge_params(config, params)
        nll, total = loss(model.hidden(inputs, positions, segments), model.output_weights(), targets, weights, 32)
        return nll / total

    params = nnx.to_pure_dict(nnx.state(Llama(config, nnx.Rngs(0))))
    if mesh is None:
        return float(jax.jit(mean_nll)(params, *arrays))
    with jax.set_mesh(mesh):
        params = jax.device_put(params, param_shardings(config, mesh))  # weights over fsdp, sp, ulysses
        return float(jax.jit(mean_nll)(params, *place(arrays, config.attention, mesh)))


@pytest.mark.parametrize("mesh_spec", ["ulysses=8", "ulysses=2,sp=4", "dp=2,ulysses=4", "ulysses=2,sp=2,tp=2"])
def test_model_mean_nll_matches_single_device_reference(mesh_spec):
    want = _mean_nll(MODEL.replace(attention="reference"), None, chunked_cross_entropy)
    got = _mean_nll(MODEL, mesh_spec, vocab_parallel_cross_entropy)
    assert abs(got - want) <= NLL_ATOL, (mesh_spec, got, want)


def test_greedy_generation_on_ulysses2_sp2_equals_one_device(tmp_path):
    """Ring prefill with the Ulysses exchange, then decoding over the cache sharded over (sp, ulysses)."""
    make_hf_llama(tmp_path / "hf", seed=0)  # 4 query heads, 1 KV head: each device gets it
    prompt = np.concatenate([[0], np.random.default_rng(0).integers(2, 256, 36)]).astype(np.int32)
    want = generate(import_hf(tmp_path / "hf"), prompt, max_new_tokens=16)
    assert len(set(want)) >= 4, want  # a non-degenerate continuation
    got = generate(import_hf(tmp_path / "hf", attention="ring"), prompt, max_new_tokens=16,
                   mesh=_mesh(ulysses=2, sp=2))
    assert got == want


# Layout ----------------------------------------------------------------------------------------


def test_lengths_account_for_ulysses():
    # ring: multiples of 2*sp*block and of sp*ulysses; short lengths one block per chunk
    assert padded_length(1025, "ring", 4, 512, ulysses=2) == 1032  # one block of 129 per chunk
    assert padded_length(37, "ring", 1, 512, ulysses=8) == 40
    assert padded_length(37, "ring", 2, 512, quantum=16, ulysses=2) == 64
    assert padded_length(37, "blockwise", 1, 512, ulysses=8) == 40
    for n in (37, 40, 100, 1025):
        for sp, u in ((1, 8), (4, 2), (2, 4)):
            m = padded_length(n, "ring", sp, 8, ulysses=u)
            assert m >= n and m % (sp * u) == 0 and ring_block(m, sp, 8, u) == min(8, m // (2 * sp))
    mesh = _mesh(ulysses=2, sp=4)
    assert seq_shards(mesh) == 8 and layout_length(1025, "ring", mesh) == 1032
    x = place((np.arange(64, dtype=np.int32)[None],), "ring", mesh)[0]
    assert x.sharding.spec[1] == ("sp", "ulysses")
    with pytest.raises(UserError, match="nearest valid lengths are 4,096 or 8,192"):
        ring_block(4100, 4, 512, 2)
