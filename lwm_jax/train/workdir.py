"""A training run's folder: the recipe fingerprint that guards it, the per-stage folders and the
files that mark a stage started, swept or finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from lwm_jax.config import RUN_FIELDS, RecipeConfig, to_dict
from lwm_jax.errors import UserError

FINAL_FILE = "final.json"
START_FILE = "start.json"
SWEEP_DIR = "theta_sweep"


def stage_dir(workdir: Path, name: str) -> Path:
    return workdir / "stages" / name


def swept_thetas(workdir: Path, recipe: RecipeConfig) -> dict[str, float]:
    """Thetas already found by the `rope_theta: sweep` stages of an earlier run in this workdir."""
    found = {}
    for stage in recipe.stages:
        result = stage_dir(workdir, stage.name) / SWEEP_DIR / "theta_sweep.json"
        if stage.rope_theta == "sweep" and result.is_file():
            found[stage.name] = float(json.loads(result.read_text())["best_theta"])
    return found


def _explicit(obj) -> Any:
    """Plain data of a config with every field left at its default dropped (recursively), so a
    field added to the configs later, with a default, does not change an existing fingerprint."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            default = (field.default if field.default is not dataclasses.MISSING else
                       field.default_factory() if field.default_factory is not dataclasses.MISSING else
                       dataclasses.MISSING)
            if value != default:
                out[field.name] = _explicit(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [_explicit(x) for x in obj]
    return obj


def recipe_fingerprint(recipe: RecipeConfig) -> str:
    """Hash of what the recipe computes. Meshes, remat, attention path and kernel are left out, so
    a run may resume on another mesh or with another policy; defaults are left out too."""
    plain = lambda x: {k: v for k, v in _explicit(x).items() if k not in ("mesh", *RUN_FIELDS)}
    data = plain(dataclasses.replace(recipe, data=None))
    data["model"] = plain(recipe.model)
    data["stages"] = [plain(stage) for stage in recipe.stages]
    data["data"] = _explicit(recipe.data) if recipe.data is not None else None
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def prepare_workdir(workdir: Path, recipe: RecipeConfig) -> None:
    """Creates the workdir, or checks that an existing one was made by this same recipe.

    Process 0 checks and writes `recipe.json`; the others wait for it at a barrier.
    """
    marker = workdir / "recipe.json"
    fingerprint = recipe_fingerprint(recipe)
    if jax.process_index() == 0:
        if marker.is_file():
            saved = json.loads(marker.read_text())
            if saved.get("fingerprint") != fingerprint:
                raise UserError(f"workdir {workdir} was made by a different recipe ({saved.get('name')!r}, "
                                f"fingerprint {saved.get('fingerprint')} vs {fingerprint}); use another --workdir")
        elif workdir.exists() and any(workdir.iterdir()):
            raise UserError(f"workdir {workdir} is not empty and holds no recipe.json; use another --workdir")
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            data = to_dict(dataclasses.replace(recipe, data=None))
            data["data"] = to_dict(recipe.data) if recipe.data is not None else None
            marker.write_text(json.dumps({"name": recipe.name, "fingerprint": fingerprint, "recipe": data},
                                         indent=2))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lwm-jax workdir ready")
