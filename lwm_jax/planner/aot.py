"""XLA's own per-device memory of a stage's real train step, compiled and never run: on simulated CPU
devices (one subprocess per stage, since the simulated device count is fixed when JAX starts), or
for a TPU slice on this host (`targets`: XLA:TPU through libtpu, every stage in one process).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from lwm_jax.config import RecipeConfig, load_recipe
from lwm_jax.errors import UserError
from lwm_jax.parallel.mesh import make_mesh
from lwm_jax.planner.targets import Target, target_mesh
from lwm_jax.progress import log
from lwm_jax.train.optimizer import make_offload, make_optimizer
from lwm_jax.train.schedule import schedule_recipe
from lwm_jax.train.step import BATCH_KEYS, build_step


def _lowered_step(recipe: RecipeConfig, plan, mesh):
    """The stage's real train step lowered for `mesh` from abstract params, optimizer state and batch.
    The step is built outside the mesh (building it evaluates on the running backend, which a mesh of
    compile-only devices cannot), lowered inside it."""
    stage = plan.stage
    tx = make_optimizer(stage.optimizer_config, stage.steps)
    fns = build_step(plan.model, tx, mesh, recipe.loss_chunk, document_mask=recipe.data.document_mask,
                     offload=make_offload(stage.optimizer_config, stage.steps),
                     natural_positions=recipe.data.packing == "continuous")
    p_abs, o_abs = fns.state_targets(plan.model, tx)
    shape = (stage.grad_accum, stage.batch_size, stage.seq_len)
    b_abs = {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_weights" else np.int32,
                                     sharding=fns.batch_sharding) for k in BATCH_KEYS}
    with jax.set_mesh(mesh):
        return fns.train_step.lower(p_abs, o_abs, b_abs)


def _stage_plan(recipe: RecipeConfig, stage_name: str, devices: int | None):
    return next(p for p in schedule_recipe(recipe, devices, check_sources=False, only_stage=stage_name)
                if p.name == stage_name)


def aot_memory(recipe: RecipeConfig, stage_name: str, devices: int | None = None) -> dict[str, int]:
    """XLA's per-device memory of the stage's real train step, compiled for its mesh, never run.

    Needs as many (simulated) devices as the stage's mesh has; the CLI starts a process per stage
    with `--cpu-devices` set accordingly.
    """
    plan = _stage_plan(recipe, stage_name, devices)
    mesh = make_mesh(plan.mesh, devices=jax.devices()[: math.prod(plan.mesh.shape)])
    mem = _lowered_step(recipe, plan, mesh).compile().memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    return {"total": int(total), "arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
            "temp": int(mem.temp_size_in_bytes), "alias": int(mem.alias_size_in_bytes)}


# XLA:TPU's refusal of a program over the chip's memory names the sizes, e.g. "HLO temporaries
# (37.53G) exceed available HBM (31.25G)" or "Ran out of memory in memory space hbm".
_REFUSAL = re.compile(r"RESOURCE_EXHAUSTED|exceeds? (the )?available|Ran out of memory", re.I)


# One allocation of XLA's dumped buffer assignment, e.g. `allocation 7: size 1048576, color 5, parameter 3,
# ...` (no color: the device's HBM) or `allocation 2: size 134217728, thread-local:`.
_ALLOCATION = re.compile(r"^allocation \d+: size (\d+)(.*)$", re.M)


def _device_allotted(dump_dir: str) -> int | None:
    """The device memory (HBM) XLA's buffer assignment lays out for the dumped train step: every
    allocation in the default memory space (arguments, outputs, constants, preallocated temporaries)
    but the thread-local ones, which live within a single op's execution (None: no dump was written)."""
    for path in sorted(Path(dump_dir).glob("*train_step*after_optimizations-buffer-assignment.txt")):
        return sum(int(size) for size, rest in _ALLOCATION.findall(path.read_text())
                   if "thread-local" not in rest and not re.search(r"color [1-9]", rest))
    return None


def target_memory(recipe: RecipeConfig, stage_name: str, target: Target) -> dict:
    """XLA:TPU's memory per chip for the stage's real train step on `target`, compiled on this host
    and never run: `{device, peak, allotted, host_temp, host_arguments, arguments, fits, compile_s}`; a
    compile the compiler refuses for memory is `fits: False` with its own message and the sizes it names.

    `peak` is `peak_memory_in_bytes`: the arguments plus the larger of the device's and the host's
    temporaries, so where host-offloaded buffers outweigh the device's temporaries it is a host figure
    (the one-node recipe from 524K: 7.5 GiB of device arguments + 16 or 32 GiB of host temporaries).
    `allotted` is the device memory the buffer assignment lays out (read from the compile's dump).
    Both bound the HBM in use from above; `device` is the smaller of the two.
    """
    plan = _stage_plan(recipe, stage_name, target.chips)
    start = time.perf_counter()
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # a compile-only executable cannot be cached
    try:
        with tempfile.TemporaryDirectory(prefix="lwm-jax-xla-") as dump:
            compiled = _lowered_step(recipe, plan, target_mesh(target, plan.mesh)).compile(
                compiler_options={"xla_dump_to": dump, "xla_dump_hlo_module_re": "train_step"})
            allotted = _device_allotted(dump)
    except Exception as err:  # XLA's errors are bare exceptions (XlaRuntimeError); only memory is expected
        if not _REFUSAL.search(str(err)):
            raise
        line = next((x for x in str(err).splitlines() if _REFUSAL.search(x)), str(err).splitlines()[0])
        return {"device": None, "peak": None, "allotted": None, "host_temp": None, "host_arguments": None,
                "arguments": None, "fits": False, "refusal": line.strip()[:300],
                "compile_s": time.perf_counter() - start}
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    mem = compiled.memory_analysis()
    peak = int(mem.peak_memory_in_bytes)
    return {"device": min(peak, allotted or peak), "peak": peak, "allotted": allotted,
            "host_temp": int(mem.host_temp_size_in_bytes), "host_arguments": int(mem.host_argument_size_in_bytes),
            "arguments": int(mem.argument_size_in_bytes), "fits": True, "refusal": None,
            "compile_s": time.perf_counter() - start}


def aot_worker(recipe_path: str, overrides: Sequence[str], stage: str, devices: int | None = None) -> dict:
    """`aot_memory` of one stage; run in a process whose JAX simulates the stage's device count."""
    return aot_memory(load_recipe(recipe_path, list(overrides)), stage, devices)


def aot_compare(recipe_path: str, overrides: Sequence[str], stages: list[dict],
                devices: int | None = None) -> list[dict]:
    """Adds `aot_memory` and `aot_memory_bytes_per_device` to each planned stage, compiled by
    `lwm-jax --cpu-devices N plan ... --aot-worker` in a subprocess per stage; returns `stages`."""
    for stage in stages:
        cmd = [sys.executable, "-m", "lwm_jax.cli", "--cpu-devices", str(stage["devices"]), "plan", recipe_path,
               "--stage", stage["name"], "--aot-worker"] + [a for kv in overrides for a in ("--set", kv)]
        if devices:
            cmd += ["--devices", str(devices)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"AOT compile of stage {stage['name']} failed: {proc.stderr.strip().splitlines()[-1]}")
        aot = json.loads(proc.stdout.strip().splitlines()[-1])
        stage["aot_memory_bytes_per_device"] = aot["total"]
        stage["aot_memory"] = aot
    return stages


def target_compare(recipe_path: str, overrides: Sequence[str], stages: list[dict], target: Target) -> list[dict]:
    """Adds XLA:TPU's figures for `target` to each planned stage (compiled here, one stage after the
    other): `aot_memory_bytes_per_device` (the peak), `aot_host_bytes_per_device`, `aot_fits`,
    `aot_compile_s` and, where the compiler refused, `aot_refusal`; returns `stages`."""
    recipe = load_recipe(recipe_path, list(overrides))
    for stage in stages:
        log(f"plan: compiling stage {stage['name']} for {target.name} (XLA:TPU, about a minute for an 8B model)")
        mem = target_memory(recipe, stage["name"], target)
        host = None if mem["host_temp"] is None else mem["host_temp"] + mem["host_arguments"]
        stage.update(aot_memory_bytes_per_device=mem["device"], aot_host_bytes_per_device=host,
                     aot_peak_memory_bytes=mem["peak"], aot_allotted_bytes_per_device=mem["allotted"],
                     aot_arguments_bytes_per_device=mem["arguments"], aot_fits=mem["fits"],
                     aot_compile_s=mem["compile_s"], aot_refusal=mem["refusal"], aot_target=target.name)
    return stages
