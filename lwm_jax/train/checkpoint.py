"""Orbax checkpoints: params (plus, in training, optimizer state and per-process data-iterator
state) and JSON metadata (model config, RoPE theta, stage).

A checkpoint path is an orbax `CheckpointManager` directory of numbered steps; loading takes the
latest step unless one is named. Params are stored as plain nested dicts and restored straight
into the shardings of the target mesh, so a checkpoint written on one mesh (or by several
processes) restores onto any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from lwm_jax.config import ModelConfig, from_dict, to_dict
from lwm_jax.errors import UserError
from lwm_jax.model.llama import Llama
from lwm_jax.parallel.mesh import state_shardings

RUNTIME_FIELDS = ("dtype", "scan_layers", "remat", "attention", "attention_block_size", "attention_kernel")
FORMAT = "lwm-jax/1"


def model_metadata(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The metadata stored beside params: the model config and its RoPE theta, plus `extra`."""
    return {"format": FORMAT, "model": to_dict(config), "rope_theta": config.rope_theta,
            "max_position_embeddings": config.max_position_embeddings, **extra}


def save_model(path: str | Path, model: Llama, metadata: dict[str, Any], step: int = 0,
               overwrite: bool = False) -> Path:
    """Writes `model`'s params and `metadata` as step `step` of the checkpoint at `path`."""
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{path} already exists and is not empty; choose a new path or pass --force")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.CheckpointManager(path) as manager:
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave(metadata)), force=True)
        manager.wait_until_finished()
    return path


def _manager_and_step(path: str | Path, step: int | None):
    path = Path(path).absolute()
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist (expected a directory made by import-hf or train)")
    manager = ocp.CheckpointManager(path)
    steps = manager.all_steps()
    if not steps:
        manager.close()
        raise UserError(f"{path} holds no orbax checkpoint steps")
    if step is None:
        step = max(steps)
    elif step not in steps:
        manager.close()
        raise UserError(f"{path} has no step {step} (available: {sorted(steps)})")
    return manager, step


def read_metadata(path: str | Path, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint step (latest by default)."""
    manager, step = _manager_and_step(path, step)
    with manager:
        restored = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        return dict(restored["metadata"])


def params_target(config: ModelConfig, mesh: Mesh | None) -> dict:
    """Abstract params (pure dict of ShapeDtypeStruct) with the shardings they restore into."""
    abstract = nnx.state(nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0))))
    if mesh is not None:
        shardings = jax.tree.leaves(nnx.to_pure_dict(state_shardings(mesh, abstract)))
    else:
        shardings = [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(jax.tree.leaves(abstract))
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(abstract))
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, shardings)])


def restore_params(path: str | Path, config: ModelConfig, mesh: Mesh | None = None,
                   step: int | None = None) -> dict:
    """Params (pure dict) of a checkpoint step, sharded for `mesh`."""
    manager, step = _manager_and_step(path, step)
    with manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params_target(config, mesh))))
    return restored["params"]


def merge_params(config: ModelConfig, params: dict) -> Llama:
    """A `Llama` module holding `params` (a pure dict)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def load_model(path: str | Path, step: int | None = None, mesh: Mesh | None = None,
               **runtime: Any) -> tuple[Llama, dict[str, Any]]:
    """Restores a `Llama` (params sharded on `mesh` if given) and its metadata.

    `runtime` overrides how the model runs (dtype, remat, attention, ...), never its shapes.
    """
    unknown = set(runtime) - set(RUNTIME_FIELDS)
    if unknown:
        raise ValueError(f"cannot override {sorted(unknown)} at load time (runtime fields: {RUNTIME_FIELDS})")
    metadata = read_metadata(path, step)
    config = from_dict(ModelConfig, metadata["model"]).replace(**runtime)
    return merge_params(config, restore_params(path, config, mesh, step)), metadata


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


