"""What `lwm-jax plan` reports: the hardware with its overrides, the analytic plan per stage and,
with `--aot`, XLA's compiled memory beside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lwm_jax.config import load_recipe
from lwm_jax.errors import UserError
from lwm_jax.hardware import Hardware, get_hardware
from lwm_jax.planner.analytic import CHECKED_AGAINST, plan_recipe
from lwm_jax.planner.aot import aot_compare, target_compare
from lwm_jax.planner.targets import deviceless_backend, get_target, require_libtpu


def resolve_hardware(name: str, memory_gib: float | None = None, peak_tflops: float | None = None,
                     efficiency: float | None = None, host_memory_gib: float | None = None) -> Hardware:
    """The hardware entry `name` (`lwm_jax.hardware`) with the given figures replaced."""
    for flag, value in (("--device-memory", memory_gib), ("--peak-tflops", peak_tflops),
                        ("--host-memory", host_memory_gib)):
        if value is not None and not value > 0:
            raise UserError(f"{flag}={value} must be > 0")
    if efficiency is not None and not 0 < efficiency <= 1:
        raise UserError(f"--efficiency={efficiency} must be in (0, 1]: the fraction of peak a step reaches")
    changes = {k: v for k, v in (("memory_gib", memory_gib), ("peak_tflops", peak_tflops),
                                  ("efficiency", efficiency), ("host_memory_gib", host_memory_gib)) if v is not None}
    return dataclasses.replace(get_hardware(name), **changes)


def plan_report(recipe_path: str, overrides: Sequence[str] = (), *, stage: str | None = None,
                devices: int | None = None, hardware: str | None = None, memory_gib: float | None = None,
                peak_tflops: float | None = None, efficiency: float | None = None, aot: bool = False,
                max_seq_len: bool = False, target: str | None = None, host_memory_gib: float | None = None) -> dict:
    """`{"hardware": ..., "target": ..., "stages": [...]}`: the recipe's plan on `hardware` (default
    L40S, or the target's chips) with overrides; with `max_seq_len` the longest sequence each stage
    fits; with `aot` XLA's memory beside it, compiled on simulated CPU devices, or with `target` (a
    TPU slice, `planner.targets`) by XLA:TPU for that slice's chips."""
    recipe = load_recipe(recipe_path, list(overrides))
    slice_ = get_target(target) if target is not None else None
    if slice_ is not None:
        require_libtpu()  # before the planning, so a missing compiler is the first thing said
        if devices is not None and devices != slice_.chips:
            raise UserError(f"--devices {devices} disagrees with --target {slice_.name} ({slice_.chips} chips)")
        devices = slice_.chips
    hw = resolve_hardware(hardware or (slice_.hardware if slice_ else "L40S"), memory_gib, peak_tflops, efficiency,
                          host_memory_gib)
    stages = plan_recipe(recipe, hw, devices, stage, max_seq_len=max_seq_len)
    if slice_ is not None:
        deviceless_backend()
        target_compare(recipe_path, overrides, stages, slice_)
    elif aot:
        aot_compare(recipe_path, overrides, stages, devices)
    out = {"hardware": dataclasses.asdict(hw), "target": None if slice_ is None else dataclasses.asdict(slice_),
           "stages": stages}
    if max_seq_len:
        out["max_seq_len_checked_against"] = CHECKED_AGAINST
    return out
