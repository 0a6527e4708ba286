"""What `lwm-jax plan` reports: the hardware with its overrides, the analytic plan per stage and,
with `--aot`, XLA's compiled memory beside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lwm_jax.config import load_recipe
from lwm_jax.errors import UserError
from lwm_jax.plan.analytic import HARDWARE, Hardware, plan_recipe_stages
from lwm_jax.plan.aot import aot_compare


def resolve_hardware(name: str, memory_gib: float | None = None, peak_tflops: float | None = None,
                     efficiency: float | None = None) -> Hardware:
    """The `HARDWARE` entry `name` with the given figures replaced."""
    if name not in HARDWARE:
        raise UserError(f"--hardware {name!r} is not one of {sorted(HARDWARE)}")
    changes = {k: v for k, v in (("memory_gib", memory_gib), ("peak_tflops", peak_tflops),
                                  ("efficiency", efficiency)) if v is not None}
    return dataclasses.replace(HARDWARE[name], **changes)


def plan_report(recipe_path: str, overrides: Sequence[str] = (), *, stage: str | None = None,
                devices: int | None = None, hardware: str = "L40S", memory_gib: float | None = None,
                peak_tflops: float | None = None, efficiency: float | None = None, aot: bool = False,
                max_seq_len: bool = False) -> dict:
    """`{"hardware": ..., "stages": [...]}`: the recipe's plan on `hardware` (with overrides), with
    `max_seq_len` the longest sequence each stage fits, and with `aot` XLA's memory beside it."""
    recipe = load_recipe(recipe_path, list(overrides))
    hw = resolve_hardware(hardware, memory_gib, peak_tflops, efficiency)
    stages = plan_recipe_stages(recipe, hw, devices, stage, max_seq_len=max_seq_len)
    if aot:
        aot_compare(recipe_path, overrides, stages, devices)
    return {"hardware": dataclasses.asdict(hw), "stages": stages}
