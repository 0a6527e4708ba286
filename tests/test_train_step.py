"""The train step: chunked loss against the plain loss, sharded step against one device, gradient
accumulation against one big batch, and the non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lwm_jax.attention.layout import to_zigzag
from lwm_jax.config import MeshConfig, ModelConfig, OptimizerConfig
from lwm_jax.model.llama import Llama
from lwm_jax.parallel.mesh import make_mesh
from lwm_jax.train.loss import chunked_cross_entropy
from lwm_jax.train.optimizer import make_optimizer
from lwm_jax.train.step import build_step, init_params

LOSS_TOL = 1e-6  # chunked vs plain loss and grads: float32 in another order; 1 ulp of the ~5.5 loss is 4.8e-7
STEP_TOL = 1e-5  # sharded vs single-device step: reductions reordered move the ~5.5 loss by 1-2 ulps (~1e-6)
# AdamW's eps in the step comparisons. Adam's first update is lr * g / (|g| + eps): with eps = 1e-8
# it is +-lr for every gradient entry above ~1e-7, so an entry that float32 summation order moves
# across zero (a near-cancelling dq, ~1e-7) moves its param by up to 2 * lr = 2e-2. With eps = 1e-3
# the update is Lipschitz in g with constant lr / eps = 10, so gradients equal to ~1e-7 (float32
# noise of the sharded reductions) give params equal to ~1e-6, inside STEP_TOL.
STEP_EPS = 1e-3

TINY = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_id=(2,))


def _batch(accum, batch, seq, seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(accum, batch, seq + 1)).astype(np.int32)
    weights = (rng.random((accum, batch, seq)) < 0.8).astype(np.float32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (accum, batch, seq)).copy()
    return {"inputs": tokens[..., :-1], "positions": positions, "segment_ids": np.ones_like(positions),
            "targets": tokens[..., 1:], "loss_weights": weights}


def test_chunked_loss_equals_plain_loss():
    model = Llama(TINY, nnx.Rngs(0))
    b = _batch(1, 2, 24)
    inputs, targets, weights = (jnp.asarray(b[k][0]) for k in ("inputs", "targets", "loss_weights"))

    def chunked(m):
        nll, w = chunked_cross_entropy(m.hidden(inputs), m.output_weights(), targets, weights, chunk_size=5)
        return nll / w

    def plain(m):
        logp = jax.nn.log_softmax(m(inputs))
        nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * weights) / jnp.sum(weights)

    (l1, g1), (l2, g2) = nnx.value_and_grad(chunked)(model), nnx.value_and_grad(plain)(model)
    assert abs(float(l1) - float(l2)) <= LOSS_TOL
    for a, b_ in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert np.abs(np.asarray(a) - np.asarray(b_)).max() <= LOSS_TOL


def _run_step(mesh_spec, batch, accum_split=None, config=TINY, natural_positions=False):
    devices = jax.devices()[:1] if mesh_spec is None else None
    mesh = make_mesh(MeshConfig.parse(mesh_spec or ""), devices=devices)
    tx = make_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_norm=1.0, eps=STEP_EPS), total_steps=10)
    with jax.set_mesh(mesh):
        fns = build_step(config, tx, mesh, natural_positions=natural_positions)
        params = init_params(config, 0, mesh)
        opt_state = fns.init_opt_state(params)
        if accum_split:
            batch = {k: v.reshape(accum_split, -1, *v.shape[2:]) for k, v in batch.items()}
        arrays = {k: jax.device_put(v, fns.batch_sharding) for k, v in batch.items()}
        params, opt_state, metrics = fns.train_step(params, opt_state, arrays)
        return jax.device_get(params), jax.device_get(metrics)


def _max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("mesh,sp", [("dp=2,sp=4", 4), ("dp=2,sp=2,ulysses=2", 2)])
def test_sharded_step_equals_single_device(mesh, sp):
    """The zigzag ring (alone, and with Ulysses inside it) against one device with dense attention."""
    batch = _batch(1, 4, 32)
    p1, m1 = _run_step(None, batch)
    zigzag = {k: to_zigzag(v, sp, axis=-1) for k, v in batch.items()}
    p8, m8 = _run_step(mesh, zigzag, config=TINY.replace(attention="ring", attention_block_size=4))
    assert abs(float(m1["loss"]) - float(m8["loss"])) <= STEP_TOL
    assert _max_diff(p1, p8) <= STEP_TOL


def test_whole_call_step_equals_the_ring_on_one_device():
    """Continuously packed sequences on a mesh without sequence shards: the attention's whole causal
    call (natural positions) against the ring's masking by the batch's positions."""
    batch = _batch(1, 4, 32)
    ring = TINY.replace(attention="ring", attention_block_size=4)
    p1, m1 = _run_step(None, batch, config=ring)
    p2, m2 = _run_step(None, batch, config=ring, natural_positions=True)
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= STEP_TOL
    assert _max_diff(p1, p2) <= STEP_TOL


def test_fsdp_tp_step_equals_single_device():
    batch = _batch(1, 4, 16)
    p1, m1 = _run_step(None, batch)
    p8, m8 = _run_step("fsdp=2,sp=2,tp=2", batch)
    assert abs(float(m1["loss"]) - float(m8["loss"])) <= STEP_TOL
    assert _max_diff(p1, p8) <= STEP_TOL


def test_grad_accumulation_equals_one_big_batch():
    batch = _batch(1, 4, 16)
    p1, m1 = _run_step(None, batch)
    p4, m4 = _run_step(None, batch, accum_split=4)
    assert abs(float(m1["loss"]) - float(m4["loss"])) <= STEP_TOL
    assert _max_diff(p1, p4) <= STEP_TOL


def test_non_finite_step_is_skipped():
    batch = _batch(1, 2, 8)
    batch["loss_weights"][0, 0, 0] = np.nan
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    tx = make_optimizer(OptimizerConfig(lr=1e-2), total_steps=10)
    with jax.set_mesh(mesh):
        fns = build_step(TINY, tx, mesh)
        params = init_params(TINY, 0, mesh)
        before = jax.device_get(params)
        opt_state = fns.init_opt_state(params)
        params, opt_state, metrics = fns.train_step(params, opt_state, batch)
    assert not bool(metrics["finite"])
    assert _max_diff(before, jax.device_get(params)) == 0.0


def _loss_temp_bytes(seq, vocab, embed=64, chunk=512):
    def loss(hidden, w, targets, weights):
        nll, count = chunked_cross_entropy(hidden, w, targets, weights, chunk_size=chunk)
        return nll / count

    args = (jax.ShapeDtypeStruct((1, seq, embed), jnp.float32), jax.ShapeDtypeStruct((embed, vocab), jnp.float32),
            jax.ShapeDtypeStruct((1, seq), jnp.int32), jax.ShapeDtypeStruct((1, seq), jnp.float32))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_loss_memory_holds_one_chunk_of_logits():
    vocab, chunk = 8192, 512
    chunk_logits = chunk * vocab * 4
    small, large = _loss_temp_bytes(4096, vocab, chunk=chunk), _loss_temp_bytes(16384, vocab, chunk=chunk)
    assert large < 4 * chunk_logits  # full logits at 16K would be 32x one chunk
    assert large - small < 0.1 * (16384 - 4096) * vocab * 4  # growth is O(seq*embed), not O(seq*vocab)
