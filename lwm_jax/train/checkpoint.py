"""Training checkpoints: params, optimizer state, per-process data-iterator state and metadata
of one stage, saved asynchronously by orbax in the model store's layout (`model.store`), so any
training checkpoint also loads as a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from lwm_jax.errors import UserError


class TrainCheckpointer:
    """Checkpoints of one training stage: params, optimizer state, data iterator, metadata.

    Saves are asynchronous (orbax) and keep the last `keep` steps. Each process writes its own
    data-iterator state (grain's handler), so every process resumes its own share of the data.
    """

    def __init__(self, directory: str | Path, keep: int, save_interval: int = 0):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                               create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)
        self.save_interval = save_interval

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return (self.save_interval > 0 and step % self.save_interval == 0) or self.manager.reached_preemption(step)

    def save(self, step: int, params, opt_state, data_iterator, metadata: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(data_iterator), metadata=ocp.args.JsonSave(metadata)),
            force=True)

    def restore(self, step: int, params_target, opt_target, data_iterator):
        """Restores `(params, opt_state, metadata)` and the data iterator's position in place.

        Each process restores its own iterator file; when the process count changed, any saved
        file serves, since the pipeline's stream (and so its position) does not depend on it.
        """
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params_target), opt_state=ocp.args.StandardRestore(opt_target),
            metadata=ocp.args.JsonRestore()))
        data_dir = Path(self.manager.directory) / str(step) / "data"
        own = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        saved = sorted(data_dir.glob("process_*-of-*.json"))
        if not own.is_file() and not saved:
            raise UserError(f"checkpoint step {step} in {self.manager.directory} has no data-iterator state")
        data_iterator.set_state((own if own.is_file() else saved[0]).read_bytes())
        return restored["params"], restored["opt_state"], dict(restored["metadata"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
