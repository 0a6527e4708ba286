"""Orbax checkpoints of a model's params plus JSON metadata (model config, theta, stage).

A checkpoint path is an orbax `CheckpointManager` directory holding numbered steps; loading takes
the latest step unless one is named. Params restore straight into the shardings of the target
mesh (from an abstract model made with `nnx.eval_shape`), so a checkpoint written on one mesh
restores onto any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lwm_jax.config import ModelConfig, from_dict, to_dict
from lwm_jax.errors import UserError
from lwm_jax.model.llama import Llama
from lwm_jax.parallel.mesh import state_shardings

RUNTIME_FIELDS = ("dtype", "scan_layers", "remat", "attention", "attention_block_size")


def model_metadata(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The metadata stored beside params: the model config and its RoPE theta, plus `extra`."""
    return {"format": "lwm-jax/1", "model": to_dict(config), "rope_theta": config.rope_theta,
            "max_position_embeddings": config.max_position_embeddings, **extra}


def save_model(path: str | Path, model: Llama, metadata: dict[str, Any], step: int = 0,
               overwrite: bool = False) -> Path:
    """Writes `model`'s params and `metadata` as step `step` of the checkpoint at `path`."""
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{path} already exists and is not empty; choose a new path or pass --force")
    params = nnx.state(model, nnx.Param)
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
        meta_file = Path(manager.directory) / str(step) / "metadata" / "metadata"
        if meta_file.is_file():
            return json.loads(meta_file.read_text())
        restored = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        return dict(restored["metadata"])


def load_model(path: str | Path, step: int | None = None, mesh=None,
               **runtime: Any) -> tuple[Llama, dict[str, Any]]:
    """Restores a `Llama` (params sharded on `mesh` if given) and its metadata.

    `runtime` overrides how the model runs (dtype, remat, attention, ...), never its shapes.
    """
    unknown = set(runtime) - set(RUNTIME_FIELDS)
    if unknown:
        raise ValueError(f"cannot override {sorted(unknown)} at load time (runtime fields: {RUNTIME_FIELDS})")
    metadata = read_metadata(path, step)
    config = from_dict(ModelConfig, metadata["model"]).replace(**runtime)
    abstract = nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0)))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    if mesh is not None:
        shardings = jax.tree.leaves(state_shardings(mesh, abstract_params))
    else:
        shardings = [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(jax.tree.leaves(abstract_params))
    leaves, treedef = jax.tree.flatten(abstract_params)
    target = treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                                for x, s in zip(leaves, shardings)])
    manager, step = _manager_and_step(path, step)
    with manager:
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    model = nnx.merge(graphdef, restored["params"], rest)
    return model, metadata
