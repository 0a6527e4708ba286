"""The memory options change nothing they compute: sequence-tiled layers = untiled, host-offloaded
layer inputs = full remat, the sharded embedding lookup = the gathered one, the vocab-parallel loss =
the chunked loss with the projection gathered; loss and gradients in float32 on the dp=2, sp=4 ring
(and fsdp x sp x tp for the shard-aware parts). Plus the planner's figures for the one-node recipe."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lwm_jax.attention.layout import place
from lwm_jax.config import MeshConfig, ModelConfig, OptimizerConfig
from lwm_jax.model.store import merge_params
from lwm_jax.parallel.mesh import make_mesh
from lwm_jax.train.loss import chunked_cross_entropy, vocab_parallel_cross_entropy
from lwm_jax.train.optimizer import make_optimizer
from lwm_jax.train.step import init_params

ROOT = Path(__file__).resolve().parents[1]
# Each pair differs only in the order of float32 sums of O(1) values over at most a few hundred
# terms (tile boundaries, shard-local partial sums), ~1e-7 at these sizes.
TOL = 1e-6
SEQ, BATCH = 64, 2
CFG = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_id=(2,), attention="ring",
                  attention_block_size=4, remat="full", seq_tile=16)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, size=(BATCH, SEQ + 1)).astype(np.int32)
    weights = (rng.random((BATCH, SEQ)) < 0.8).astype(np.float32)
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ))
    return tokens[:, :-1], positions, tokens[:, 1:], weights


@functools.cache  # the plain configuration is every test's reference: compile it once per mesh
def loss_and_grads(config: ModelConfig, mesh_spec: str = "dp=2,sp=4", loss=vocab_parallel_cross_entropy):
    """(loss, grads as a tuple of numpy arrays) of the mean NLL of a fixed batch."""
    mesh = make_mesh(MeshConfig.parse(mesh_spec))
    with jax.set_mesh(mesh):
        params = init_params(config, 0, mesh)
        arrays = place(_batch(), config.attention, mesh)

        def mean_nll(params, inputs, positions, targets, weights):
            model = merge_params(config, params)
            nll, total = loss(model.hidden(inputs, positions), model.output_weights(), targets, weights, 32)
            return nll / total

        value, grads = jax.jit(jax.value_and_grad(mean_nll))(params, *arrays)
    return float(value), tuple(np.asarray(g) for g in jax.tree.leaves(grads))


def assert_same(a, b):
    assert abs(a[0] - b[0]) <= TOL, (a[0], b[0])
    for x, y in zip(a[1], b[1]):
        assert np.abs(x - y).max() <= TOL


def test_tiled_layers_equal_untiled():
    assert_same(loss_and_grads(CFG.replace(seq_tile=4)), loss_and_grads(CFG))  # 4 tiles of 4 per device


def test_offloaded_layer_inputs_equal_full_remat_and_go_to_host():
    assert_same(loss_and_grads(CFG.replace(remat="offload")), loss_and_grads(CFG))
    mesh = make_mesh(MeshConfig(dp=2, sp=4))
    with jax.set_mesh(mesh):
        params = init_params(CFG.replace(remat="offload"), 0, mesh)
        inputs, positions = place(_batch()[:2], "ring", mesh)

        def total(params):
            return merge_params(CFG.replace(remat="offload"), params).hidden(inputs, positions).sum()

        program = str(jax.make_jaxpr(jax.grad(total))(params))
    assert "<host>" in program  # the layer inputs are moved to host memory and back (XLA:CPU shares one memory)


@pytest.mark.parametrize("mesh_spec", ["dp=2,sp=4", "fsdp=2,sp=2,tp=2"])
def test_sharded_embedding_equals_gathered(mesh_spec):
    assert_same(loss_and_grads(CFG.replace(embed_lookup="sharded"), mesh_spec),
                loss_and_grads(CFG.replace(embed_lookup="gathered"), mesh_spec))


@pytest.mark.parametrize("mesh_spec", ["dp=2,sp=4", "fsdp=2,sp=2,tp=2"])
def test_vocab_parallel_loss_equals_gathered_projection(mesh_spec):
    assert_same(loss_and_grads(CFG, mesh_spec), loss_and_grads(CFG, mesh_spec, loss=chunked_cross_entropy))


def test_bfloat16_moments_are_stored_in_bfloat16():
    mesh = make_mesh(MeshConfig(dp=2, sp=4))
    tx = make_optimizer(OptimizerConfig(moment_dtype="bfloat16"), 10)
    with jax.set_mesh(mesh):
        state = tx.init(init_params(CFG, 0, mesh))
    floats = [x.dtype for x in jax.tree.leaves(state) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
    assert floats and all(d.name == "bfloat16" for d in floats)


def _plan(*args, recipe=ROOT / "configs/recipes/gradient_1048k_one_node.yaml"):
    proc = subprocess.run([sys.executable, "-m", "lwm_jax.cli", "plan", str(recipe), *args, "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("hardware", ["H100", "L40S"])
def test_one_node_recipe_fits_every_stage_on_8_devices(hardware):
    stages = _plan("--hardware", hardware)["stages"]
    assert [s["name"] for s in stages] == ["65K", "262K", "524K", "1048K"]
    assert all(s["devices"] == 8 and s["fits"] for s in stages)
    if hardware == "H100":
        assert stages[-1]["memory_bytes_per_device"] <= 40 * 2**30


def test_longest_sequence_on_one_h100_node_passes_4m():
    (stage,) = _plan("--stage", "1048K", "--max-seq-len", "--hardware", "H100")["stages"]
    assert stage["max_seq_len"] >= 4_194_304 and stage["max_seq_len"] % (2 * 8 * 2048) == 0


@pytest.mark.slow
def test_planner_agrees_with_xla_at_1m_on_8_devices():
    """The 1048K stage compiled for 8 simulated devices (nothing runs); XLA:CPU holds the offloaded
    layer inputs in ordinary memory and bf16 as float32, which the planner's XLA:CPU figure counts."""
    (stage,) = _plan("--stage", "1048K", "--aot")["stages"]
    ratio = stage["memory_bytes_per_device_xla_cpu"] / stage["aot_memory_bytes_per_device"]
    assert 0.8 <= ratio <= 1.2, ratio


def test_one_gpu_recipe_fits_every_stage_on_one_h100_past_half_a_million_tokens():
    """configs/recipes/gradient_1048k_one_gpu.yaml: masters and moments offloaded, every stage fits
    one 80 GB GPU, the longest sequence is at least ALST's 500K, and the host memory it needs is
    the state (8B params x (4 + 2 x 2) bytes) plus the offloaded layer inputs."""
    stages = _plan("--hardware", "H100", "--max-seq-len",
                   recipe=ROOT / "configs/recipes/gradient_1048k_one_gpu.yaml")["stages"]
    assert [s["name"] for s in stages] == ["65K", "262K", "524K", "1048K"]
    assert all(s["devices"] == 1 and s["fits"] for s in stages)
    longest = stages[-1]["max_seq_len"]
    assert longest >= 524_288 and stages[-1]["seq_len"] == 524_288
    params = 8_030_261_248  # Llama-3-8B
    layer_inputs = 32 * longest * 4096 * 2
    assert stages[-1]["max_seq_len_host_bytes_per_device"] == params * 8 + layer_inputs
    assert stages[-1]["memory"]["optimizer"] < stages[-1]["memory"]["params"] / 4  # one layer's state on the device
