"""A training run's folder: the recipe fingerprint that guards it, its lock, the per-stage folders
and the files that mark a stage started, swept or finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lwm_jax.config import RUN_FIELDS, RecipeConfig, to_dict
from lwm_jax.errors import UserError
from lwm_jax.outputs import check_output_dir
from lwm_jax.train.lock import LOCK_FILE, WorkdirLock

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


def _check_or_write_recipe(workdir: Path, recipe: RecipeConfig) -> bool:
    """Checks that the workdir was made by this recipe, or writes `recipe.json` into a new or empty
    one; returns whether it wrote it."""
    marker = workdir / "recipe.json"
    fingerprint = recipe_fingerprint(recipe)
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{marker} is damaged ({err}); restore it or use another --workdir") from None
        if saved.get("fingerprint") != fingerprint:
            raise UserError(f"workdir {workdir} was made by a different recipe ({saved.get('name')!r}, "
                            f"fingerprint {saved.get('fingerprint')} vs {fingerprint}); use another --workdir")
        return False
    if any(entry.name != LOCK_FILE for entry in workdir.iterdir()):
        raise UserError(f"workdir {workdir} is not empty and holds no recipe.json; use another --workdir")
    data = to_dict(dataclasses.replace(recipe, data=None))
    data["data"] = to_dict(recipe.data) if recipe.data is not None else None
    marker.write_text(json.dumps({"name": recipe.name, "fingerprint": fingerprint, "recipe": data}, indent=2))
    return True


def has_progress(workdir: Path) -> bool:
    """Whether any stage of the workdir saved a checkpoint step or a theta-sweep result."""
    return (any(p.name.isdigit() for p in workdir.glob("stages/*/checkpoints/*"))
            or any(workdir.glob(f"stages/*/{SWEEP_DIR}/theta_sweep.json")))


@dataclasses.dataclass
class WorkdirClaim:
    """A workdir held by this run: its lock (process 0 only) and whether this run created it."""

    workdir: Path
    lock: WorkdirLock | None
    created: bool  # this run wrote recipe.json into a new or empty folder
    existed: bool  # the folder was there before

    def release(self, failed: bool) -> None:
        """Drops the lock. After a failure that saved nothing, a workdir this run created is emptied
        again (and removed if it was new), so the corrected command is not refused as another recipe's."""
        if self.lock is None:
            return
        undo = failed and self.created and not has_progress(self.workdir)
        if undo:
            for entry in self.workdir.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                elif entry.name != LOCK_FILE:
                    entry.unlink()
        self.lock.release()
        if undo and not self.existed:
            with contextlib.suppress(OSError):
                self.workdir.rmdir()


def claim_workdir(workdir: Path, recipe: RecipeConfig) -> WorkdirClaim:
    """Locks the workdir (process 0, once a file could be made there) and creates it, or checks that
    it was made by this same recipe.

    Process 0 decides and tells the others, so every process fails together with one message.
    """
    lock, created, existed, error = None, False, workdir.exists(), None
    if jax.process_index() == 0:
        try:
            check_output_dir(workdir, "workdir")
            lock = WorkdirLock(workdir).acquire()
            created = _check_or_write_recipe(workdir, recipe)
        except UserError as err:
            if lock is not None:
                lock.release()
            lock, error = None, err
    if jax.process_count() > 1:
        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            error = UserError(f"process 0 could not claim workdir {workdir} (its error says why)")
    if error is not None:
        raise error
    return WorkdirClaim(workdir, lock, created, existed)
