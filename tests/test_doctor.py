"""`lwm-jax doctor` on 8 simulated CPU devices and on 2 processes x 4 devices on 127.0.0.1 (its JSON
keys, their types, the links of each mesh axis), its documentation (`--help`, README), the kernel
choice on the other platforms and the intra/inter-node rule in-process, and
`scripts/device_check.sh --tiny`, so that the prepared device check never rots."""

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from lwm_jax.cli import build_parser
from lwm_jax.config import MeshConfig
from lwm_jax.doctor import JSON_KEYS, kernel_report, link_report
from lwm_jax.hardware import HARDWARE
from lwm_jax.parallel.mesh import make_mesh
from tests.conftest import ROOT, cli_error

REQUIRED = {"platform", "devices", "processes", "versions", "attention_kernel", "kernels", "matmul_tflops", "links",
            "memory"}  # what every report must hold, whatever else JSON_KEYS adds
DEMO = str(ROOT / "configs/recipes/demo_cpu.yaml")
# The planner against XLA's compiled memory of the tiny train step (float32, so XLA:CPU keeps every
# buffer at its planned width): the agreement the README states for the demo recipe, within 20%.
PLAN_VS_XLA_TOL = 0.2
TIMEOUT_S = 180  # one doctor run takes ~5 s here; generous for a loaded 2-core machine


def _cli(*argv, cpu_devices=8, process=None, port=None):
    cmd = [sys.executable, "-m", "lwm_jax.cli", "--cpu-devices", str(cpu_devices)]
    if process is not None:
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process),
                "--heartbeat-timeout", "20"]
    return cmd + list(argv)


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _check_links(links: dict, sizes: dict[str, int]) -> None:
    assert set(links) == set(sizes)
    for axis, size in sizes.items():
        link = links[axis]
        assert link["size"] == size and link["bytes_per_device"] >= 1 << 20
        for key in ("ppermute_gbps", "all_to_all_gbps"):
            assert isinstance(link[key], float) and math.isfinite(link[key]) and link[key] > 0, (axis, key)


def test_doctor_json_on_8_simulated_devices():
    run = subprocess.run(_cli("doctor", "--mesh", "dp=2,sp=4", "--json"), capture_output=True, text=True,
                         timeout=TIMEOUT_S, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    r = _last_json(run.stdout)
    assert set(r) >= REQUIRED and set(r) == set(JSON_KEYS)
    assert r["platform"] == "cpu"
    assert r["devices"]["count"] == r["devices"]["local"] == 8 and r["devices"]["per_process"] == {"0": 8}
    assert r["processes"] == {"count": 1, "index": 0}
    assert r["versions"]["jax"] == jax.__version__ and all(r["versions"][k] for k in ("flax", "optax", "grain"))
    assert r["hardware"]["name"] is None and "no hardware table entry" in r["hardware"]["source"]
    assert r["attention_kernel"]["name"] == "xla" and isinstance(r["attention_kernel"]["reason"], str)
    assert r["kernels"]["xla"]["can_run"] and not r["kernels"]["cudnn"]["can_run"]
    assert "not on cpu" in r["kernels"]["cudnn"]["reason"]
    mm = r["matmul_tflops"]
    assert isinstance(mm["measured"], float) and mm["measured"] > 0 and mm["peak"] is None and mm["dtype"] == "float32"
    assert r["mesh"] == "dp=2,fsdp=1,sp=4,tp=1"
    _check_links(r["links"], {"dp": 2, "sp": 4})
    assert all(link["assumed_gbps"] is None for link in r["links"].values())  # no table entry for cpu
    assert r["memory"]["free_bytes"] is None and "memory_stats" in r["memory"]["reason"]
    assert r["plan"] is None


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_doctor_on_two_processes():
    port = _port()
    argv = ("doctor", "--mesh", "dp=2,sp=4", "--json", "--hardware", "H100", "--recipe", DEMO, "--stage", "x16")
    procs = [subprocess.Popen(_cli(*argv, cpu_devices=4, process=i, port=port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    r = _last_json(outs[0][0])
    assert not any(line.startswith("{") for line in outs[1][0].splitlines())  # process 0 prints
    assert r["processes"] == {"count": 2, "index": 0}
    assert r["devices"] == {"kind": "cpu", "count": 8, "local": 4, "per_process": {"0": 4, "1": 4}}
    _check_links(r["links"], {"dp": 2, "sp": 4})
    # 8 devices, H100 nodes of 8: both axes stay inside one node.
    assert {a: (x["link"], x["assumed_gbps"]) for a, x in r["links"].items()} == {
        "dp": ("intra-node", HARDWARE["H100"].intra_node_gbps), "sp": ("intra-node", HARDWARE["H100"].intra_node_gbps)}
    assert r["matmul_tflops"]["peak"] == HARDWARE["H100"].peak_tflops
    (plan,) = r["plan"]
    assert plan["name"] == "x16" and plan["mesh"] == "dp=2,fsdp=1,sp=4,tp=1" and plan["fits"] is True
    assert 0 < plan["memory_bytes_per_device"] < plan["device_memory_bytes"]


def test_links_follow_the_node_rule():
    hw = dataclasses.replace(HARDWARE["H100"], name="test", devices_per_node=4, intra_node_gbps=100.0,
                             inter_node_gbps=10.0)
    links = link_report(make_mesh(MeshConfig(dp=2, sp=4)), hw, 1 << 16)
    # dp pairs device i with i + 4: another node of 4; sp's 4 neighbours share one.
    assert {a: (x["link"], x["assumed_gbps"]) for a, x in links.items()} == {
        "dp": ("inter-node", 10.0), "sp": ("intra-node", 100.0)}
    assert links["sp"]["bytes_per_device"] == 1 << 16 and links["dp"]["all_to_all_gbps"] > 0


def test_kernel_choice_on_each_platform():
    """auto: on GPU cuDNN for calls that merge nothing and the Pallas kernel (Triton) for ring and
    Ulysses steps; on TPU the Pallas kernel (Mosaic) for both, splash only when named; on CPU the
    pure-JAX kernel (the Pallas kernel runs interpreted there, when named)."""
    gpu_auto, gpu = kernel_report("gpu", jnp.bfloat16, 128)
    assert (gpu_auto["name"], gpu_auto["whole_call"]) == ("pallas", "cudnn") and gpu["cudnn"]["can_run"]
    assert "ring and Ulysses steps: the fused pallas kernel" in gpu_auto["reason"]
    f32_auto, f32 = kernel_report("gpu", jnp.float32, 128)
    assert (f32_auto["name"], f32_auto["whole_call"]) == ("pallas", "pallas") and "float32" in f32["cudnn"]["reason"]
    seg_auto, _ = kernel_report("gpu", jnp.bfloat16, 128, segments=True)
    assert seg_auto["whole_call"] == "pallas"  # cuDNN's public call takes no segment ids
    tpu_auto, tpu = kernel_report("tpu", jnp.bfloat16, 128)
    assert (tpu_auto["name"], tpu_auto["whole_call"]) == ("pallas", "pallas") and tpu["splash"]["can_run"]
    assert "splash can run, but auto does not pick it on tpu" in tpu_auto["reason"]
    odd_auto, odd = kernel_report("tpu", jnp.bfloat16, 96)
    assert not odd["splash"]["can_run"] and "head_dim=96" in odd["splash"]["reason"]
    assert odd_auto["name"] == "xla" and not odd["pallas"]["can_run"]  # 96 is not a power of two
    cpu_auto, cpu = kernel_report("cpu", jnp.float32, 128)
    assert (cpu_auto["name"], cpu_auto["whole_call"]) == ("xla", "xla")
    assert [k for k in ("xla", "cudnn", "splash", "pallas") if cpu[k]["can_run"]] == ["xla", "pallas"]
    assert "pallas can run, but auto does not pick it on cpu" in cpu_auto["reason"]


def test_every_json_key_is_documented(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["doctor", "--help"])
    help_text = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    for key in JSON_KEYS:
        assert f"  {key}: " in help_text, key
        assert f"`{key}`" in readme, key


@pytest.mark.parametrize("argv, message", [
    (["doctor", "--stage", "x16"], "--stage needs --recipe"),
    (["doctor", "--recipe", DEMO, "--stage", "nope"], "'nope' is not a stage"),
    (["doctor", "--mesh", "dp=3"], "needs 3 devices but 8"),
    (["doctor", "--hardware", "H800"], "--hardware 'H800' is not one of"),
])
def test_doctor_bad_input_is_one_line(capsys, argv, message):
    assert message in cli_error(capsys, argv)


def test_device_check_tiny(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(ROOT / "scripts/device_check.sh"), "--tiny", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "device_check.json").read_text())
    assert result["complete"] and set(result) == {"doctor", "attention", "train", "generate", "complete"}
    assert set(result["doctor"]["links"]) == {"dp", "sp"}
    train = result["train"]
    assert train["seq_len"] == train["planner_longest_seq"] and len(train["losses"]) == 3
    assert train["losses"][-1] < train["losses"][0] and train["tokens_per_s"] > 0 and train["mfu"] > 0
    assert abs(train["planned_bytes"] / train["compiled_bytes"] - 1) <= PLAN_VS_XLA_TOL
    gen = result["generate"]
    assert gen["prefill_tokens_per_s"] > 0 and gen["decode_tokens_per_s"] > 0
    table = (out / "device_check.md").read_text().splitlines()
    assert table[:2] == ["| measure | value |", "|---|---|"] and len(table) == 2 + 8
    assert not any("failed" in row for row in table)


def test_doctor_warns_when_host_memory_is_short(monkeypatch):
    """With optimizer.offload the masters and moments of this process's devices live in its RAM:
    the plan says how much, against the machine's, and warns when it is short."""
    from lwm_jax import doctor
    from lwm_jax.cli.doctor import plan_lines
    from lwm_jax.config import load_recipe

    recipe = load_recipe(DEMO, ["stages.base.optimizer.offload=true"])
    memory = {"free_bytes": None, "bytes_limit": None, "per_device": [], "reason": "none"}
    (roomy,) = doctor.stage_plans(recipe, "base", None, memory)
    assert roomy["host_fits"] and 0 < roomy["host_bytes_per_process"] <= roomy["host_memory_bytes"]
    monkeypatch.setattr(doctor, "_host_memory", lambda: roomy["host_bytes_per_process"] - 1)
    (short,) = doctor.stage_plans(recipe, "base", None, memory)
    assert not short["host_fits"]
    assert "WARNING: host memory is short" in plan_lines(short)[-1]
    assert plan_lines(roomy)[-1].endswith("fits")
