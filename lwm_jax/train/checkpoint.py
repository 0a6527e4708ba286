"""Training checkpoints: params, optimizer state, per-process data-iterator state and metadata
of one stage, saved asynchronously by orbax in the model store's layout (`model.store`), so any
training checkpoint also loads as a model.

A checkpoint is trusted only once it reads back whole and every array matches the content digest
written with it (`model.digest`): resuming restores the newest step that does and moves damaged
newer ones aside with a warning. A save that fails (disk full) stops the run with
one message while the previous step, never touched by orbax's temporary-folder commit, stays readable;
the failed step's temporary folders are removed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lwm_jax.errors import UserError
from lwm_jax.model.digest import check_digests, tree_digests
from lwm_jax.model.store import reading_checkpoint
from lwm_jax.outputs import os_reason
from lwm_jax.progress import log

DAMAGED_DIR = "damaged"  # beside the checkpoints folder: steps that did not read back, kept for a look
ORBAX_TMP = ".orbax-checkpoint-tmp"  # in the name of a step orbax has not finished writing
SETTLE_S, UNFINISHED_WAIT_S = 0.5, 10.0  # a failed step's temporary folders: gone this long, at most this wait


class TrainCheckpointer:
    """Checkpoints of one training stage: params, optimizer state, data iterator, metadata.

    Saves are asynchronous (orbax) and keep the last `keep` steps. Each process writes its own
    data-iterator state (grain's handler), so every process resumes its own share of the data.
    """

    def __init__(self, directory: str | Path, keep: int, save_interval: int = 0):
        # cleanup_tmp_directories: what a killed (or too slowly failing) save left is removed on the next start.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                               create=True, cleanup_tmp_directories=True)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.save_interval = save_interval
        self._in_flight: int | None = None  # the step whose asynchronous save may still be writing
        self._closed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return (self.save_interval > 0 and step % self.save_interval == 0) or self.manager.reached_preemption(step)

    def save(self, step: int, params, opt_state, data_iterator, metadata: dict[str, Any]) -> None:
        """Starts saving `step` (after the previous save finished); a failed write is a `UserError`."""
        self._finish()
        metadata = {**metadata, "digests": {"params": tree_digests(params), "opt_state": tree_digests(opt_state)}}
        try:
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                data=grain.checkpoint.CheckpointSave(data_iterator), metadata=ocp.args.JsonSave(metadata)),
                force=True)
        except Exception as err:  # orbax's writers raise OSError, ValueError or bare Exception
            raise self._save_failed(step, err) from err
        self._in_flight = step

    def restore(self, step: int, params_target, opt_target, data_iterator):
        """Restores `(params, opt_state, metadata)` and the data iterator's position in place; a part
        that does not read back is a `UserError` naming it.

        Each process restores its own iterator file; when the process count changed, any saved
        file serves, since the pipeline's stream (and so its position) does not depend on it.
        """
        where = self.directory / str(step)
        with reading_checkpoint(where / "metadata"):
            metadata = dict(self.manager.restore(step, args=ocp.args.Composite(
                metadata=ocp.args.JsonRestore()))["metadata"])
        if metadata.get("step") != step:
            raise UserError(f"checkpoint {where / 'metadata'} says step {metadata.get('step')!r}, not {step}")
        with reading_checkpoint(where / "params"):
            params = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params_target)))["params"]
        with reading_checkpoint(where / "opt_state"):
            opt_state = self.manager.restore(step, args=ocp.args.Composite(
                opt_state=ocp.args.StandardRestore(opt_target)))["opt_state"]
        expected = metadata.get("digests") or {}
        check_digests(tree_digests(params), expected.get("params"), where / "params")
        check_digests(tree_digests(opt_state), expected.get("opt_state"), where / "opt_state")
        data_dir = where / "data"
        own = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        saved = sorted(data_dir.glob("process_*-of-*.json"))
        if not own.is_file() and not saved:
            raise UserError(f"checkpoint step {step} in {self.directory} has no data-iterator state")
        state_file = own if own.is_file() else saved[0]
        with reading_checkpoint(state_file):
            state = state_file.read_bytes()
            json.loads(state)  # grain's state is JSON: garbage fails here, with the position of the damage
            data_iterator.set_state(state)
        return params, opt_state, metadata

    def restore_newest_good(self, params_target, opt_target, data_iterator):
        """`(step, params, opt_state, metadata)` of the newest step that reads back whole, or None
        when there are no steps. A damaged newer step is named in a warning and moved to
        `../damaged/STEP` (so the resumed run can save that step again); every process agrees on the
        step, since each reads its own share."""
        while self.manager.all_steps():
            step = max(self.manager.all_steps())
            try:
                restored, problem = self.restore(step, params_target, opt_target, data_iterator), None
            except UserError as err:
                restored, problem = None, str(err)
            if jax.process_count() > 1:
                bad = multihost_utils.process_allgather(np.int32(problem is not None))
                if np.any(bad) and problem is None:
                    problem = "another process could not read its share of it"
            if problem is None:
                return (step, *restored)
            older = [s for s in self.manager.all_steps() if s < step]
            if not older:
                raise UserError(f"no readable checkpoint left in {self.directory}: step {step}: {problem}; "
                                f"move the folder away to restart the stage")
            log(f"warning: skipping damaged checkpoint step {step}: {problem}; resuming from step {max(older)}")
            self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        """Moves a damaged step out of the manager's folder (process 0) and rereads the step list."""
        if jax.process_index() == 0:
            target = self.directory.parent / DAMAGED_DIR / str(step)
            suffix = 1
            while target.exists():
                target, suffix = target.with_name(f"{step}.{suffix}"), suffix + 1
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
            log(f"  (moved to {target})")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"lwm-jax set aside step {step}")
        self.manager.reload()

    def _save_failed(self, step: int, err: BaseException) -> UserError:
        """The one-line error of a failed save, once orbax's writers stopped and the failed step's
        temporary folders are gone (so the folder holds whole steps only)."""
        with contextlib.suppress(Exception):  # its writers of other parts may still run: let them end
            self.manager.wait_until_finished()
        self._remove_unfinished()
        kept = [s for s in self.manager.all_steps() if s < step]
        previous = (f"the previous checkpoint (step {max(kept)}) is intact; free space and rerun the same "
                    "command to resume from it" if kept else "no earlier checkpoint of this stage exists")
        detail = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
        reason = os_reason(err) or f"{type(err).__name__}: {detail}"
        return UserError(f"saving checkpoint step {step} in {self.directory} failed: {reason}; {previous}")

    def _remove_unfinished(self) -> None:
        """Removes orbax's temporary folders of unfinished steps (`STEP.orbax-checkpoint-tmp*`; process
        0). The array writes of a save that failed as it started can still be landing from tensorstore's
        threads, making them again: they are removed until they stay gone for `SETTLE_S` (at most
        `UNFINISHED_WAIT_S`; what lands later, the next run's manager removes)."""
        if jax.process_index() != 0:
            return
        deadline = time.monotonic() + UNFINISHED_WAIT_S
        removed = False
        while True:
            found = list(self.directory.glob(f"*{ORBAX_TMP}*"))
            for entry in found:
                shutil.rmtree(entry, ignore_errors=True)
            removed = removed or bool(found)
            if not removed or time.monotonic() > deadline:
                return
            time.sleep(SETTLE_S if not found else 0.05)
            if not found and not any(self.directory.glob(f"*{ORBAX_TMP}*")):
                return

    def _finish(self) -> None:
        """Waits for the save in flight; its failure, raised by orbax here, is a `UserError`."""
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # the asynchronous write's own error, re-raised by orbax
            raise self._save_failed(step if step is not None else -1, err) from err

    def wait(self) -> None:
        self._finish()

    def close(self) -> None:
        """Waits for the save in flight and stops orbax's background threads (once); no temporary
        folder of a failed save is left."""
        if self._closed:
            return
        self._finish()
        self._closed = True
        self.manager.close()
        self._remove_unfinished()

    def abort(self) -> None:
        """Closes after another error (which stays the one reported): a failed save in flight is
        only logged, and orbax's threads are stopped so none is left writing when the process exits."""
        try:
            self.close()
        except UserError as err:
            log(f"warning: {err}")
            self._closed = True
            self.manager.close()
            self._remove_unfinished()  # the writers of a save that failed as it started ended only now
