"""XLA's own per-device memory of a stage's real train step, compiled for its mesh on simulated
CPU devices and never run; one subprocess per stage, since the simulated device count is fixed when
JAX starts.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Sequence

import jax
import numpy as np

from lwm_jax.config import RecipeConfig, load_recipe
from lwm_jax.errors import UserError
from lwm_jax.model.store import params_target
from lwm_jax.parallel.mesh import make_mesh
from lwm_jax.train.optimizer import make_optimizer
from lwm_jax.train.schedule import schedule_recipe
from lwm_jax.train.step import BATCH_KEYS, build_step


def aot_memory(recipe: RecipeConfig, stage_name: str, devices: int | None = None) -> dict[str, int]:
    """XLA's per-device memory of the stage's real train step, compiled for its mesh, never run.

    Needs as many (simulated) devices as the stage's mesh has; the CLI starts a process per stage
    with `--cpu-devices` set accordingly.
    """
    plan = next(p for p in schedule_recipe(recipe, devices, check_sources=False, only_stage=stage_name)
                if p.name == stage_name)
    stage = plan.stage
    mesh = make_mesh(plan.mesh, devices=jax.devices()[: math.prod(plan.mesh.shape)])
    tx = make_optimizer(stage.optimizer_config, stage.steps)
    with jax.set_mesh(mesh):
        fns = build_step(plan.model, tx, mesh, recipe.loss_chunk, document_mask=recipe.data.document_mask)
        p_abs = params_target(plan.model, mesh)
        o_abs = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             jax.eval_shape(tx.init, p_abs), fns.opt_shardings)
        shape = (stage.grad_accum, stage.batch_size, stage.seq_len)
        b_abs = {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_weights" else np.int32,
                                         sharding=fns.batch_sharding) for k in BATCH_KEYS}
        compiled = fns.train_step.lower(p_abs, o_abs, b_abs).compile()
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    return {"total": int(total), "arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
            "temp": int(mem.temp_size_in_bytes), "alias": int(mem.alias_size_in_bytes)}


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
