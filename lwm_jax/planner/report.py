"""What `lwm-jax plan` reports: the hardware with its overrides, the analytic plan per stage and,
with `--aot`, XLA's compiled memory beside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lwm_jax.config import load_recipe
from lwm_jax.errors import UserError
from lwm_jax.hardware import Hardware, get_hardware
from lwm_jax.planner.analytic import plan_recipe
from lwm_jax.planner.aot import aot_compare


def resolve_hardware(name: str, memory_gib: float | None = None, peak_tflops: float | None = None,
                     efficiency: float | None = None) -> Hardware:
    """The hardware entry `name` (`lwm_jax.hardware`) with the given figures replaced."""
    for flag, value in (("--device-memory", memory_gib), ("--peak-tflops", peak_tflops)):
        if value is not None and not value > 0:
            raise UserError(f"{flag}={value} must be > 0")
    if efficiency is not None and not 0 < efficiency <= 1:
        raise UserError(f"--efficiency={efficiency} must be in (0, 1]: the fraction of peak a step reaches")
    changes = {k: v for k, v in (("memory_gib", memory_gib), ("peak_tflops", peak_tflops),
                                  ("efficiency", efficiency)) if v is not None}
    return dataclasses.replace(get_hardware(name), **changes)


def plan_report(recipe_path: str, overrides: Sequence[str] = (), *, stage: str | None = None,
                devices: int | None = None, hardware: str = "L40S", memory_gib: float | None = None,
                peak_tflops: float | None = None, efficiency: float | None = None, aot: bool = False,
                max_seq_len: bool = False) -> dict:
    """`{"hardware": ..., "stages": [...]}`: the recipe's plan on `hardware` (with overrides), with
    `max_seq_len` the longest sequence each stage fits, and with `aot` XLA's memory beside it."""
    recipe = load_recipe(recipe_path, list(overrides))
    hw = resolve_hardware(hardware, memory_gib, peak_tflops, efficiency)
    stages = plan_recipe(recipe, hw, devices, stage, max_seq_len=max_seq_len)
    if aot:
        aot_compare(recipe_path, overrides, stages, devices)
    return {"hardware": dataclasses.asdict(hw), "stages": stages}
