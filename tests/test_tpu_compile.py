"""XLA:TPU on this CPU host: libtpu describes a TPU slice without a TPU, and the real sharded train
step (the zigzag ring over sp=4) compiles for it, so `lwm-jax plan --target` keeps working. The
layer inputs `remat: offload` keeps in host memory are XLA:TPU's host temporaries, equal to the
planner's host figure, and nothing goes to host memory without it; a program over a chip's memory
is a "does not fit" row with the compiler's own message, not a crash."""

import importlib.util
import json

import pytest

from lwm_jax.cli import main
from lwm_jax.cli.train import plan_lines
from lwm_jax.config import RecipeConfig, from_dict
from lwm_jax.planner import targets
from lwm_jax.planner.analytic import host_bytes_per_device
from lwm_jax.planner.aot import target_memory
from lwm_jax.train.schedule import schedule_recipe
from tests.conftest import ROOT, cli_error

SEQ = 2048


def _recipe(remat: str, mesh: dict | None = None, **model) -> RecipeConfig:
    """A tiny Llama (heads of 128, the lane width TPUs tile by) on sp=4, one 2,048-token sequence."""
    return from_dict(RecipeConfig, {
        "name": "tpu_tiny", "mesh": mesh or {"sp": 4}, "loss_chunk": 512,
        "model": {"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512, "num_layers": 2,
                  "num_heads": 2, "num_kv_heads": 1, "head_dim": 128, "bos_token_id": 1, "eos_token_id": [2],
                  "dtype": "bfloat16", "remat": remat, "attention": "ring", "attention_block_size": 256, **model},
        "stages": [{"name": "s", "seq_len": SEQ, "steps": 1, "batch_size": 1, "init_from": "scratch",
                    "rope_theta": 10000, "optimizer": {"moment_dtype": "bfloat16"}}]})


@pytest.mark.parametrize("remat", ["offload", "full"])
def test_sharded_step_compiles_for_a_tpu_slice_with_its_host_offload(remat):
    recipe = _recipe(remat)
    mem = target_memory(recipe, "s", targets.get_target("v5p-4"))
    plan = schedule_recipe(recipe, 4, check_sources=False)[0]
    assert mem["fits"] and mem["peak"] >= mem["device"] > mem["arguments"] > 0 and mem["allotted"] >= mem["device"]
    # The offloaded layer inputs: num_layers x local tokens x hidden x 2 bytes, no more, no less.
    assert mem["host_temp"] == host_bytes_per_device(plan.model, plan.mesh, SEQ, 1)
    assert (mem["host_temp"] > 0) == (remat == "offload")


def test_a_program_over_the_chips_memory_is_a_row_not_a_crash():
    """An 8B-wide model on one v5e chip (16 GB): XLA:TPU refuses it, and the refusal is the result."""
    recipe = _recipe("full", {"sp": 1}, hidden_size=4096, intermediate_size=14336, num_layers=8,
                     vocab_size=128256, num_heads=32, num_kv_heads=8)
    refused = target_memory(recipe, "s", targets.get_target("v5e-1"))
    assert not refused["fits"] and refused["peak"] is None and refused["compile_s"] > 0
    assert "HBM" in refused["refusal"] or "memory" in refused["refusal"].lower(), refused["refusal"]


def test_plan_target_cli(capsys):
    """`plan --target` on the CPU demo recipe's first stage (dp=2, sp=4: 8 chips): the planner for the
    target's chips beside XLA:TPU's, as a table and as JSON."""
    recipe = str(ROOT / "configs/recipes/demo_cpu.yaml")
    assert main(["plan", recipe, "--stage", "base", "--target", "v5p-8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    table = "\n".join(plan_lines(result, aot=True))
    assert "compiled for v5p-8 (v5:2x2x2) by XLA:TPU" in table and "xla GiB" in table
    (stage,) = result["stages"]
    assert result["hardware"]["name"] == "TPU v5p" and result["target"]["name"] == "v5p-8"
    assert stage["aot_fits"] and stage["aot_memory_bytes_per_device"] > 0 and stage["aot_compile_s"] > 0
    assert stage["host_bytes_per_device"] == stage["aot_host_bytes_per_device"] == 0  # demo: remat full


def test_missing_libtpu_is_one_line(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(targets.importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    err = cli_error(capsys, ["plan", str(ROOT / "configs/recipes/demo_cpu.yaml"), "--target", "v5p-8"])
    assert "needs libtpu: pip install -e '.[tpu]'" in err
