"""`lwm-jax doctor`: what these devices give a run, over `lwm_jax.doctor.run_doctor`.
Parsing and printing only (process 0 prints; every process takes part in the link measurements).
"""

from __future__ import annotations

import argparse
import textwrap

from lwm_jax.cli.common import command, print_result
from lwm_jax.config import MeshConfig
from lwm_jax.doctor import JSON_KEYS, run_doctor
from lwm_jax.planner import GIB


def _gbps(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def doctor_lines(r: dict) -> list[str]:
    """The readable report of `run_doctor`'s result."""
    dev, proc, mm = r["devices"], r["processes"], r["matmul_tflops"]
    lines = [f"platform    {r['platform']}: {dev['count']} x {dev['kind']} ({dev['local']} on this process)",
             f"processes   {proc['count']} (this is process {proc['index']}); devices per process: "
             + ", ".join(f"{i}: {n}" for i, n in sorted(dev["per_process"].items())),
             "versions    " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
             f"hardware    {r['hardware']['name'] or '-'}: {r['hardware']['source']}",
             f"attention   auto -> {r['attention_kernel']['name']} for {r['attention_kernel']['call']}: "
             f"{r['attention_kernel']['reason']}"]
    for name, k in r["kernels"].items():
        lines.append(f"  {name:<9} {'can run' if k['can_run'] else 'cannot run: ' + k['reason']}")
    peak = (f" of {mm['peak']:g} peak ({mm['fraction']:.0%}; {mm['peak_source']})" if mm["peak"]
            else f" ({mm['peak_source']})")
    lines.append(f"matmul      {mm['measured']:.3f} TFLOP/s {mm['dtype']} n={mm['n']}{peak}")
    lines.append(f"links       mesh {r['mesh']}" + ("" if r["links"] else ": no axis of size > 1"))
    if r["links"]:
        lines.append(f"  {'axis':<5}{'size':>5}{'MiB':>8}{'ppermute GB/s':>15}{'all_to_all GB/s':>17}"
                     f"{'assumed GB/s':>14}  link")
        for axis, link in r["links"].items():
            lines.append(f"  {axis:<5}{link['size']:>5}{link['bytes_per_device'] / 2**20:>8.1f}"
                         f"{_gbps(link['ppermute_gbps']):>15}{_gbps(link['all_to_all_gbps']):>17}"
                         f"{_gbps(link['assumed_gbps']):>14}  {link['link'] or '-'}")
    mem = r["memory"]
    lines.append("memory      " + (mem["reason"] if mem["free_bytes"] is None else
                                   f"{mem['free_bytes'] / GIB:.2f} GiB free of {mem['bytes_limit'] / GIB:.2f} GiB "
                                   "(smallest device of this process)"))
    for s in r["plan"] or []:
        lines += plan_lines(s)
    return lines


def plan_lines(s: dict) -> list[str]:
    """A stage's plan on these devices: device memory, and host memory where the stage keeps any there."""
    lines = [f"plan        stage {s['name']}: seq {s['seq_len']:,} on {s['mesh']}: "
             f"{s['memory_bytes_per_device'] / GIB:.2f} GiB of {s['device_memory_bytes'] / GIB:.2f} GiB "
             f"({s['memory_source']}) per device: {'fits' if s['fits'] else 'DOES NOT FIT'}"]
    if s["host_bytes_per_process"]:
        lines.append(f"            host memory {s['host_bytes_per_process'] / GIB:.2f} GiB of "
                     f"{s['host_memory_bytes'] / GIB:.2f} GiB RAM for this process's devices: "
                     + ("fits" if s["host_fits"] else "WARNING: host memory is short"))
    return lines


def cmd_doctor(args) -> int:
    """Which devices and processes JAX sees, the library versions, the attention kernel `auto` picks
    and why (and for every other kernel whether it can run), the measured matmul rate and the
    ppermute / all_to_all bandwidth over each mesh axis against the planner's hardware table, the
    free device memory and, with --recipe, whether the stage's plan fits these devices. Run it on
    every process of a multi-host run (the links are measured across them); process 0 prints."""
    mesh = MeshConfig.parse(args.mesh) if args.mesh else None
    result = run_doctor(mesh, recipe=args.recipe, stage=args.stage, hardware=args.hardware)
    print_result(args, result, doctor_lines(result))
    return 0


def register(sub) -> None:
    """Adds `doctor`."""
    epilog = "JSON keys (--json):\n" + "\n".join(
        textwrap.fill(f"{k}: {v}", 100, initial_indent="  ", subsequent_indent="      ") for k, v in JSON_KEYS.items())
    p = command(sub, "doctor", cmd_doctor, help="devices, kernels, matmul rate, link bandwidth, memory, plan fit",
                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", help="mesh whose axes' links are measured, e.g. dp=2,sp=4 (default sp=all devices)")
    p.add_argument("--recipe", metavar="YAML", help="plan this recipe's stages on these devices")
    p.add_argument("--stage", metavar="NAME", help="plan only this stage (with --recipe)")
    p.add_argument("--hardware", metavar="NAME",
                   help="compare against this planner hardware entry (default: the one matching the device kind)")
