"""`lwm-jax train`, `plan` and `theta`: running a context-extension recipe, planning its memory and
time, and the RoPE theta rules. Parsing and printing only, over `train.runner`, `plan` and `model.rope`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lwm_jax.cli.common import command, print_result
from lwm_jax.config import load_recipe
from lwm_jax.convert.hf import import_hf_params
from lwm_jax.errors import UserError
from lwm_jax.eval.plots import line_plot
from lwm_jax.eval.theta_sweep import stage_sweep
from lwm_jax.model.rope import theta_for
from lwm_jax.planner import aot_worker, plan_report
from lwm_jax.planner.targets import TARGETS
from lwm_jax.train.runner import TrainServices, train


def write_loss_plot(workdir: Path, recipe) -> Path | None:
    """WORKDIR/loss.png: training loss by global step (the stages' steps end to end), one line per
    stage; None when no step was logged."""
    if not (workdir / "metrics.jsonl").is_file():
        return None
    offsets, total = {}, 0
    for stage in recipe.stages:
        offsets[stage.name], total = total, total + stage.steps
    series: dict[str, tuple[list[float], list[float]]] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill; the resumed run writes it again
            continue
        x, y = series.setdefault(record["stage"], ([], []))
        x.append(offsets.get(record["stage"], 0) + record["step"])
        y.append(record["loss"])
    if not series:
        return None
    return line_plot(series, workdir / "loss.png", f"{recipe.name}: training loss", "global step", "loss")


# What training takes from conversion and evaluation: HF weights for `init_from: hf:DIR`, the theta
# search for `rope_theta: sweep`, and the loss curve drawn when a run ends.
SERVICES = TrainServices(load_hf=import_hf_params, sweep_theta=stage_sweep, after_run=write_loss_plot)

GIB = 2**30


def cmd_theta(args) -> int:
    """Computes the RoPE base (theta) for a target context from the scaling-law rule
    b**(ln(L/2pi)/ln(L0/2pi)) (what Gradient used) or the NTK-aware rule b*(L/L0)**(d/(d-2)).
    Domains (an error outside them): scaling-law needs b > 1, L > 2pi and L0 > 2pi (ln(L0/2pi) > 0;
    L0 just above 2pi, e.g. 7, overflows float64); ntk needs b > 1, L, L0 > 0, an even d > 2 and
    a theta above 1."""
    theta = theta_for(args.method, args.context, args.base, args.head_dim, args.orig_context)
    print_result(args, {"theta": theta, "method": args.method, "context": args.context},
                 [f"{args.method} theta for context {args.context:,}: {theta:,.0f}"])
    return 0


def _parse_profile(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    start, sep, end = text.partition(":")
    if not (sep and start.isdigit() and end.isdigit() and int(start) < int(end)):
        raise UserError(f"--profile {text!r} must be START:END step numbers with START < END")
    return int(start), int(end)


def cmd_train(args) -> int:
    """Trains the stages of RECIPE in order (each from the previous stage's final params, with its
    own seq_len and RoPE theta). The whole recipe is checked against the devices before anything
    compiles. Rerunning the same command resumes an unfinished stage exactly and skips finished
    ones; a damaged newest checkpoint is skipped (with a warning naming its step) for the newest
    readable one. One run at a time holds WORKDIR (WORKDIR/train.lock). SIGTERM or Ctrl-C saves the
    current step and exits (143, 130). Writes WORKDIR/metrics.jsonl, loss.png (loss by global step
    per stage), TensorBoard events and orbax checkpoints. A stage with optimizer.offload=true keeps
    its float32 master weights and AdamW moments in host memory (one accelerator for an 8B model:
    configs/recipes/gradient_1048k_one_gpu.yaml)."""
    recipe = load_recipe(args.recipe, args.set or [])
    profile = _parse_profile(args.profile)
    workdir = Path(args.workdir or f"runs/{recipe.name}")
    try:
        summaries = train(recipe, workdir, only_stage=args.stage, profile=profile, services=SERVICES)
    except KeyboardInterrupt:  # Ctrl-C before the steps began, or twice: nothing to save
        print("lwm-jax: interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        raise SystemExit(130) from None
    lines = [f"{'stage':>8} {'seq_len':>9} {'theta':>15} {'steps':>6} {'final loss':>11} {'tokens/s':>10}"]
    for s in summaries:
        loss = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "-"
        tps = f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "-"
        lines.append(f"{s['stage']:>8} {s['seq_len']:>9,} {s['rope_theta']:>15,.0f} {s['steps']:>6} {loss:>11} "
                     f"{tps:>10}")
    lines.append(f"workdir: {workdir}")
    print_result(args, {"workdir": str(workdir), "stages": summaries}, lines)
    return 0


def plan_lines(result: dict, aot: bool) -> list[str]:
    hw, target = result["hardware"], result.get("target")
    # --aot compiles for XLA:CPU, which holds bf16 as float32: its figure is set beside the analytic
    # one at 4-byte activations ("paper@cpu"), not beside the accelerator's. A --target compile is
    # XLA:TPU's own figure for the chip, set beside the planner's for that chip.
    cpu_aot = aot and target is None
    longest = "max_seq_len" in result["stages"][0]
    lines = [f"{hw['name']}: {hw['memory_gib']:g} GiB, {hw['peak_tflops']:g} TFLOP/s at {hw['efficiency']:.0%} "
             f"efficiency, {hw['host_memory_gib']:.0f} GiB of host RAM per device"
             + (f"; compiled for {target['name']} ({target['topology']}) by XLA:TPU" if target else ""),
             f"{'stage':>7} {'seq_len':>10} {'devices':>7} {'GiB/device':>10} {'host GiB':>8} {'fits':>5} "
             f"{'step s':>8} {'minutes':>8}" + (f" {'paper@cpu':>9} {'aot GiB':>8}" if cpu_aot else "")
             + (f" {'xla GiB':>8} {'xla host':>8} {'ratio':>6} {'xla fits':>8} {'compile s':>9}" if target else "")
             + (f" {'max seq_len':>12} {'its host GiB':>12}" if longest else "")]
    for s in result["stages"]:
        extra = (f" {s['memory_bytes_per_device_xla_cpu'] / GIB:>9.2f} {s['aot_memory_bytes_per_device'] / GIB:>8.2f}"
                 if cpu_aot else "")
        if target and s["aot_fits"]:
            ratio = s["memory_bytes_per_device"] / s["aot_memory_bytes_per_device"]
            extra += (f" {s['aot_memory_bytes_per_device'] / GIB:>8.2f} {s['aot_host_bytes_per_device'] / GIB:>8.2f}"
                      f" {ratio:>6.3f} {'yes':>8} {s['aot_compile_s']:>9.0f}")
        elif target:
            extra += f" {'-':>8} {'-':>8} {'-':>6} {'NO':>8} {s['aot_compile_s']:>9.0f}"
        lines.append(f"{s['name']:>7} {s['seq_len']:>10,} {s['devices']:>7} "
                     f"{s['memory_bytes_per_device'] / GIB:>10.2f} {s['host_bytes_per_device'] / GIB:>8.2f} "
                     f"{'yes' if s['fits'] else 'NO':>5} {s['step_s']:>8.1f} {s['estimated_minutes']:>8.1f}"
                     f"{extra}" + (f" {s['max_seq_len']:>12,} {s['max_seq_len_host_bytes_per_device'] / GIB:>12.2f}"
                                   if longest else ""))
    lines += [f"{s['name']}: XLA:TPU refused it: {s['aot_refusal']}" for s in result["stages"]
              if target and not s["aot_fits"]]
    lines += [f"{s['name']}: its {s['host_bytes_per_device'] / GIB:.2f} GiB of host memory per device exceed the "
              f"host's {hw['host_memory_gib']:.0f} GiB per device" for s in result["stages"] if not s["host_fits"]]
    if longest:
        lines.append(f"max seq_len: the planner's, {result['max_seq_len_checked_against']}")
    return lines


def cmd_plan(args) -> int:
    """Per stage and device: params, optimizer state, gradients, activations kept by the remat
    policy, ring buffers, the loss chunk, the total and whether it fits; estimated step time from
    FLOPs and link bandwidths. --aot compiles the real train step for each stage's mesh on simulated
    CPU devices (nothing runs) and reports XLA's per-device memory next to the analytic figure.
    --target SLICE compiles it for a TPU slice with XLA:TPU, here, without a TPU (libtpu, from the
    `tpu` extra): XLA's peak and host memory per chip beside the planner's for that chip, the ratio,
    whether the compiler accepts it (a refusal for memory is a "does not fit" row with XLA's
    message) and the compile time. Slices count chips: v4-1, v4-8, v5e-1, v5e-8, v5p-1, v5p-4, v5p-8,
    v5p-64, v6e-1, v6e-8 (v5p-8 = 8 chips, `v5:2x2x2`; Google's v5p names count TensorCores)."""
    if args.aot_worker:  # one stage, in a process started with --cpu-devices = its device count
        print(json.dumps(aot_worker(args.recipe, args.set or [], args.stage, args.devices)))
        return 0
    result = plan_report(args.recipe, args.set or [], stage=args.stage, devices=args.devices,
                         hardware=args.hardware, memory_gib=args.device_memory, peak_tflops=args.peak_tflops,
                         efficiency=args.efficiency, aot=args.aot, max_seq_len=args.max_seq_len, target=args.target,
                         host_memory_gib=args.host_memory)
    print_result(args, result, plan_lines(result, args.aot))
    return 0


def _add_theta(sub) -> None:
    p = command(sub, "theta", cmd_theta, help="RoPE theta for a target context length")
    p.add_argument("--context", type=int, required=True, help="target context length L in tokens")
    p.add_argument("--base", type=float, default=500_000.0, help="original theta b (default 500000)")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dim d (default 128)")
    p.add_argument("--orig-context", type=int, default=8192, help="original context L0 (default 8192)")
    p.add_argument("--method", choices=("scaling-law", "ntk"), default="scaling-law",
                   help="formula (default scaling-law)")


def _add_train(sub) -> None:
    p = command(sub, "train", cmd_train, help="run a progressive context-extension recipe")
    p.add_argument("recipe", help="recipe YAML, e.g. configs/recipes/demo_cpu.yaml")
    p.add_argument("--stage", metavar="NAME", help="run only this stage (its init source must exist)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set stages.base.steps=3 --set model.remat=none")
    p.add_argument("--workdir", metavar="DIR", help="run folder (default runs/<recipe name>)")
    p.add_argument("--profile", metavar="START:END",
                   help="write a JAX profiler trace of these steps to WORKDIR/profile")


def _add_plan(sub) -> None:
    p = command(sub, "plan", cmd_plan, help="memory and time per stage and device, on paper or compiled")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--stage", metavar="NAME", help="plan only this stage")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--devices", type=int, metavar="N", help="device count for every stage (default: each stage's mesh)")
    p.add_argument("--hardware", help="device kind from the hardware table: L40S (default), H100, H200, B200, A100, "
                   "'TPU v4', 'TPU v5e', 'TPU v5p', 'TPU v6e' (default with --target: the target's chips)")
    p.add_argument("--device-memory", type=float, metavar="GIB", help="override the device memory")
    p.add_argument("--host-memory", type=float, metavar="GIB",
                   help="override a device's share of its host's RAM, which holds what is offloaded")
    p.add_argument("--peak-tflops", type=float, metavar="F", help="override the dense bf16 peak per device")
    p.add_argument("--efficiency", type=float, metavar="X", help="fraction of peak reached (default 0.4)")
    p.add_argument("--max-seq-len", action="store_true",
                   help="also search the longest seq_len each stage fits on its devices and their share of the "
                        "host's RAM (JSON: max_seq_len)")
    p.add_argument("--aot", action="store_true", help="also compile each stage with XLA (slow for large meshes)")
    p.add_argument("--target", metavar="SLICE", choices=tuple(TARGETS),
                   help="compile each stage for this TPU slice with XLA:TPU, on this host (needs the tpu extra): "
                        + ", ".join(TARGETS) + " (chips)")
    p.add_argument("--aot-worker", action="store_true", help=argparse.SUPPRESS)


def register(sub) -> None:
    """Adds `train`, `plan` and `theta`."""
    _add_train(sub)
    _add_plan(sub)
    _add_theta(sub)
