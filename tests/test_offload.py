"""`optimizer.offload`: host-resident float32 masters and AdamW moments, updated one layer at a time,
train exactly as the plain step does (one device, gradient accumulation, bf16 moments, the dp=2, sp=4
ring); the program moves one layer's state between host and device inside the layer scan; XLA:TPU
places the whole state in host memory; a backend without host memory is one error line."""

import jax
import numpy as np
import pytest

from lwm_jax.attention.layout import to_zigzag
from lwm_jax.config import MeshConfig, OptimizerConfig
from lwm_jax.errors import UserError
from lwm_jax.parallel.mesh import make_mesh
from lwm_jax.planner import targets
from lwm_jax.planner.aot import target_memory
from lwm_jax.train import offload
from lwm_jax.train.optimizer import make_offload, make_optimizer
from lwm_jax.train.step import build_step, init_params
from tests.conftest import ROOT, cli_error
from tests.test_tpu_compile import _recipe
from tests.test_train_step import STEP_EPS, TINY, _batch

# Offloaded vs plain, three steps: the same float32 math, but the offloaded program fetches weights
# and updates slices inside loops, so XLA fuses and orders the reductions of the forward and backward
# differently: gradients agree to float32 noise (~1e-7, as in test_train_step). STEP_EPS makes AdamW's
# update Lipschitz in the gradient (lr / eps = 10), so params move apart by ~1e-6 a step, and stay
# within STEP_TOL's 1e-5 over three.
OFFLOAD_TOL = 1e-5
STEPS = 3


def _train(mesh_spec: str | None, offloaded: bool, config=TINY, batch=None, accum: int = 1,
           moment_dtype: str = "float32"):
    """(losses, params, opt_state) after STEPS steps on one fixed batch."""
    mesh = make_mesh(MeshConfig.parse(mesh_spec or ""), devices=jax.devices()[:1] if mesh_spec is None else None)
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_norm=1.0, eps=STEP_EPS, moment_dtype=moment_dtype,
                          offload=offloaded)
    tx = make_optimizer(cfg, total_steps=10)
    batch = _batch(1, 4, 32) if batch is None else batch
    batch = {k: v.reshape(accum, -1, *v.shape[2:]) for k, v in batch.items()}
    with jax.set_mesh(mesh):
        fns = build_step(config, tx, mesh, offload=make_offload(cfg, 10))
        params = jax.device_put(init_params(config, 0, mesh), fns.params_shardings)
        opt_state = fns.init_opt_state(params)
        kinds = {x.sharding.memory_kind for x in jax.tree.leaves((params, opt_state))}
        assert kinds == {"pinned_host" if offloaded else "device"}
        losses = []
        for _ in range(STEPS):
            arrays = {k: jax.device_put(v, fns.batch_sharding) for k, v in batch.items()}
            params, opt_state, metrics = fns.train_step(params, opt_state, arrays)
            losses.append(float(metrics["loss"]))
        assert {x.sharding.memory_kind for x in jax.tree.leaves((params, opt_state))} == kinds
        return losses, jax.device_get(params), jax.device_get(opt_state)


def _assert_same(a, b):
    assert np.abs(np.subtract(a[0], b[0])).max() <= OFFLOAD_TOL, (a[0], b[0])
    for x, y in zip(jax.tree.leaves(a[1:]), jax.tree.leaves(b[1:]), strict=True):
        assert np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).max() <= OFFLOAD_TOL


@pytest.mark.parametrize("accum,moment_dtype", [(1, "float32"), (2, "float32"), (1, "bfloat16")])
def test_offloaded_step_equals_plain_on_one_device(accum, moment_dtype):
    _assert_same(_train(None, True, accum=accum, moment_dtype=moment_dtype),
                 _train(None, False, accum=accum, moment_dtype=moment_dtype))


def test_offloaded_step_equals_plain_on_the_ring():
    config = TINY.replace(attention="ring", attention_block_size=4)
    batch = {k: to_zigzag(v, 4, axis=-1) for k, v in _batch(1, 4, 32).items()}
    _assert_same(_train("dp=2,sp=4", True, config, batch), _train("dp=2,sp=4", False, config, batch))


def test_offloaded_step_equals_plain_with_sharded_weights():
    """fsdp x sp x tp: every weight sharded, the embedding and head by vocabulary (moved whole per
    device, not in row chunks), accumulation over two micro-batches."""
    _assert_same(_train("fsdp=2,sp=2,tp=2", True, accum=2), _train("fsdp=2,sp=2,tp=2", False, accum=2))


def _moves_in_scans(jaxpr, inside: bool = False):
    """(operand type, result type) of every `device_put` inside a loop body (`scan`, `while`)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "device_put" and inside:
            yield str(eqn.invars[0].aval), str(eqn.outvars[0].aval)
        for value in eqn.params.values():
            sub = getattr(value, "jaxpr", None)
            if sub is not None:
                yield from _moves_in_scans(sub, inside or eqn.primitive.name in ("scan", "while"))


def test_the_layer_loops_move_one_layers_state_between_host_and_device():
    """Inside the step's layer loops, one layer's `[embed, mlp]` slice of the stacked masters and
    moments (`[layers, embed, mlp]` in host memory) is brought to the device and written back."""
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    cfg = OptimizerConfig(offload=True)
    tx = make_optimizer(cfg, 10)
    fns = build_step(TINY, tx, mesh, offload=make_offload(cfg, 10))
    params, opt_state = fns.state_targets(TINY, tx)
    batch = {k: jax.ShapeDtypeStruct((1, 2, 16), v.dtype, sharding=fns.batch_sharding)
             for k, v in _batch(1, 2, 16).items()}
    with jax.set_mesh(mesh):
        moves = set(_moves_in_scans(jax.make_jaxpr(fns.train_step)(params, opt_state, batch).jaxpr))
    layer = f"[{TINY.hidden_size},{TINY.intermediate_size}]"
    assert (f"float32<host>{layer}", f"float32{layer}") in moves  # fetched
    assert (f"float32{layer}", f"float32<host>{layer}") in moves  # written back
    assert not any(f"[{TINY.num_layers}," in a for a, _ in moves)  # never a whole stack at once


def test_xla_tpu_keeps_the_whole_state_in_host_memory():
    """A tiny model compiled for one v5p chip: with offload, every byte of params and moments is a
    host argument and the device's arguments are the batch alone; without it, the other way round."""
    def compiled(offloaded):
        recipe = _recipe("full", {"sp": 1})
        stage = recipe.stages[0]
        stage = stage.__class__(**{**stage.__dict__, "optimizer": stage.optimizer.__class__(
            **{**stage.optimizer.__dict__, "offload": offloaded})})
        return target_memory(recipe.__class__(**{**recipe.__dict__, "stages": (stage,)}), "s",
                             targets.get_target("v5p-1"))

    plain, offloaded = compiled(False), compiled(True)
    batch = offloaded["arguments"]  # the [1, 1, 2048] batch arrays the step reads, 4 bytes a token each
    assert 0 < batch <= 5 * 2048 * 4 and plain["host_arguments"] == 0
    assert offloaded["host_arguments"] == plain["arguments"] - batch
    assert offloaded["device"] < plain["device"]


def test_a_backend_without_host_memory_is_one_error_line(capsys, monkeypatch):
    class Device:
        platform = "metal"

        def addressable_memories(self):
            raise NotImplementedError("no memory spaces")

    with pytest.raises(UserError, match="needs host memory the metal backend can address"):
        offload.check_host_memory([Device()])
    monkeypatch.setattr(offload, "memory_kinds", lambda device: {"device"})
    err = cli_error(capsys, ["train", str(ROOT / "configs/recipes/demo_cpu.yaml"), "--workdir", "/nonexistent/w",
                             "--set", "stages.base.optimizer.offload=true"])
    assert "stages.base.optimizer.offload=true needs host memory the cpu backend can address" in err
