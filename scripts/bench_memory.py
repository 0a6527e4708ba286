"""Memory benchmark of the planner: the longest Llama-3-8B sequence that fits each cluster, and
what each memory technique saves at 1M tokens on one 8-GPU node; with --aot, XLA's compiled
per-device memory of the one-node 1048K stage beside the planner's (8 simulated CPU devices); with
--tpu, the longest sequence XLA:TPU compiles the same stage at on a v5p-8 slice (8 chips of 95 GiB),
found by compiling at the planner's longest length for v5p (bounded by the chip's HBM and by its
share of the host's RAM, where the offloaded layer inputs go) and stepping down one layout quantum
(2 * sp * block tokens) at a time until the compiler accepts it (libtpu, no TPU needed; each
compile takes about a minute on 2 cores).

All figures are the planner's (`lwm_jax.plan`), for the 1048K stage of
configs/recipes/gradient_1048k_one_node.yaml: batch 1, 16 micro-batches per step, bf16 compute,
layer inputs offloaded to host, sequence-tiled layers, sharded embedding, vocab-parallel loss,
bf16 AdamW moments.

Usage: python scripts/bench_memory.py [--aot] [--tpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lwm_jax.config import MeshConfig, load_recipe  # noqa: E402
from lwm_jax.hardware import HARDWARE  # noqa: E402
from lwm_jax.planner import (  # noqa: E402
    GIB,
    host_bytes_per_device,
    longest_fitting,
    memory_per_device,
    plan_recipe,
)

RECIPE = ROOT / "configs/recipes/gradient_1048k_one_node.yaml"
ONE_GPU = ROOT / "configs/recipes/gradient_1048k_one_gpu.yaml"
CLUSTERS = [  # (label, hardware, mesh)
    ("1 x H100", "H100", MeshConfig(sp=1)),
    ("8 x H100 (one node)", "H100", MeshConfig(sp=8)),
    ("64 x H100", "H100", MeshConfig(sp=64)),
    ("8 x L40S", "L40S", MeshConfig(sp=8)),
    ("512 x L40S (Gradient's cluster)", "L40S", MeshConfig(fsdp=16, sp=32)),
    ("TPU v5p-128 (64 chips)", "TPU v5p", MeshConfig(sp=64)),
]


def longest_table(stage, model, loss_chunk) -> list[dict]:
    rows = []
    for label, hw_name, mesh in CLUSTERS:
        hw = HARDWARE[hw_name]
        batch = max(stage.batch_size, mesh.dp * mesh.fsdp)
        n = longest_fitting(model, mesh, batch, stage.grad_accum, loss_chunk, hw, moment_bytes=2)
        mem = memory_per_device(model, mesh, n, batch, stage.grad_accum, loss_chunk, moment_bytes=2,
                                platform=hw.platform)
        rows.append({"cluster": label, "hardware": hw_name, "mesh": mesh.spec(), "max_seq_len": n,
                     "device_gib": mem["total"] / GIB,
                     "host_gib": host_bytes_per_device(model, mesh, n, batch) / GIB})
    return rows


def one_gpu_row() -> dict:
    """1 x H100 with the float32 masters and AdamW moments in host memory: the 1048K stage of
    configs/recipes/gradient_1048k_one_gpu.yaml (sp=1, whole-call attention, loss chunks of 2,048)."""
    (plan,) = plan_recipe(load_recipe(ONE_GPU), HARDWARE["H100"], only_stage="1048K", max_seq_len=True)
    n = plan["max_seq_len"]
    return {"cluster": "1 x H100, optimizer offload", "hardware": "H100", "mesh": plan["mesh"], "max_seq_len": n,
            "device_gib": None, "host_gib": plan["max_seq_len_host_bytes_per_device"] / GIB}


def savings(stage, model, loss_chunk) -> list[dict]:
    """Device GiB at 1M tokens on sp=8 with everything on, and with each technique off in turn."""
    mesh, seq = MeshConfig(sp=8), 1_048_576

    def total(m, moment_bytes=2):
        return memory_per_device(m, mesh, seq, stage.batch_size, stage.grad_accum, loss_chunk,
                                 moment_bytes=moment_bytes)["total"] / GIB

    base = total(model)
    off = {
        "layer inputs offloaded to host (remat offload vs full)": total(model.replace(remat="full")),
        "sequence-tiled layers (2,048-token tiles vs the whole local sequence)":
            total(model.replace(seq_tile=seq // 8)),
        "sharded embedding lookup (vs the table gathered whole)": total(model.replace(embed_lookup="gathered")),
        "bfloat16 AdamW moments (vs float32)": total(model, moment_bytes=4),
    }
    return [{"technique": k, "without_gib": v, "saves_gib": v - base} for k, v in off.items()] + [
        {"technique": "all on", "without_gib": base, "saves_gib": 0.0}]


def aot_check() -> dict:
    proc = subprocess.run([sys.executable, "-m", "lwm_jax.cli", "plan", str(RECIPE), "--stage", "1048K", "--aot",
                           "--json"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(proc.stderr)
    stage = json.loads(proc.stdout.strip().splitlines()[-1])["stages"][0]
    paper, aot = stage["memory_bytes_per_device_xla_cpu"], stage["aot_memory_bytes_per_device"]
    return {"paper_xla_cpu_gib": paper / GIB, "aot_gib": aot / GIB, "ratio": paper / aot}


def tpu_longest(recipe, stage_name: str = "1048K", target_name: str = "v5p-8", max_tries: int = 6) -> dict:
    """The longest `seq_len` of the stage that XLA:TPU accepts on `target_name`, starting at the
    planner's longest for the target's chips and stepping down one layout quantum per refusal."""
    import dataclasses

    from lwm_jax.planner import length_unit
    from lwm_jax.planner.aot import target_memory
    from lwm_jax.planner.targets import deviceless_backend, get_target, target_hardware
    from lwm_jax.train.schedule import schedule_recipe

    deviceless_backend()
    target = get_target(target_name)
    plan = next(p for p in schedule_recipe(recipe, target.chips, check_sources=False, only_stage=stage_name))
    st, hw = plan.stage, target_hardware(target)
    planned = longest_fitting(plan.model, plan.mesh, st.batch_size, st.grad_accum, recipe.loss_chunk, hw,
                              moment_bytes=2)
    unit, tries = length_unit(plan.model, plan.mesh), []
    seq = planned
    while len(tries) < max_tries:
        stages = tuple(dataclasses.replace(s, seq_len=seq) if s.name == stage_name else s for s in recipe.stages)
        mem = target_memory(dataclasses.replace(recipe, stages=stages), stage_name, target)
        tries.append({"seq_len": seq, **mem})
        print(f"  {target_name} at {seq:,} tokens: " + (f"fits, XLA:TPU {mem['device'] / GIB:.2f} GiB"
              if mem["fits"] else f"refused ({mem['refusal']})") + f", compile {mem['compile_s']:.0f} s", flush=True)
        if mem["fits"]:
            break
        seq -= unit
    compiled = tries[-1]["seq_len"] if tries[-1]["fits"] else None
    return {"target": target_name, "hardware": hw.name, "memory_gib": hw.memory_gib, "planner_longest": planned,
            "compiled_longest": compiled, "quantum": unit, "tries": tries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aot", action="store_true", help="also compile the 1048K stage on 8 simulated devices")
    parser.add_argument("--tpu", action="store_true",
                        help="also find the longest 1048K-stage sequence XLA:TPU compiles on v5p-8 (libtpu; slow)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    stage = recipe.stage("1048K")
    model = recipe.model.replace(max_position_embeddings=stage.seq_len)
    rows = longest_table(stage, model, recipe.loss_chunk) + [one_gpu_row()]
    print(f"{'cluster':>32} {'mesh':>26} {'longest seq_len':>16} {'GiB/device':>10} {'host GiB':>9}")
    for r in rows:
        device = "-" if r["device_gib"] is None else f"{r['device_gib']:.1f}"
        print(f"{r['cluster']:>32} {r['mesh']:>26} {r['max_seq_len']:>16,} {device:>10} {r['host_gib']:>9.1f}")
    saved = savings(stage, model, recipe.loss_chunk)
    print("\nAt 1,048,576 tokens on 8 devices (sp=8), GiB per device without each technique:")
    for r in saved:
        print(f"  {r['technique']:<72} {r['without_gib']:>7.1f} (saves {r['saves_gib']:.1f})")
    result = {"longest": rows, "savings_at_1m": saved}
    if args.aot:
        result["aot_1048k"] = aot_check()
        a = result["aot_1048k"]
        print(f"\n1048K stage on 8 simulated devices: planner (XLA:CPU figure) {a['paper_xla_cpu_gib']:.1f} GiB, "
              f"XLA {a['aot_gib']:.1f} GiB, ratio {a['ratio']:.3f}")
    if args.tpu:
        print("\nThe longest 1048K-stage sequence on a v5p-8 slice (8 chips, 95 GiB each):")
        result["tpu_longest"] = t = tpu_longest(recipe)
        print(f"planner (TPU v5p) {t['planner_longest']:,} tokens; XLA:TPU compiles "
              + (f"{t['compiled_longest']:,}" if t["compiled_longest"] else f"none of {len(t['tries'])} tried"))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
