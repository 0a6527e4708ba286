"""The model store: a model's params with JSON metadata (model config, RoPE theta, stage) as an
orbax checkpoint, and the Hugging Face `config.json` reader.

A checkpoint path is an orbax `CheckpointManager` directory of numbered steps; loading takes the
latest step unless one is named. Params are stored as plain nested dicts and restored straight
into the shardings of the target mesh, so a checkpoint written on one mesh (or by several
processes) restores onto any other. Training checkpoints (`train.checkpoint`) add optimizer and
data-iterator state to the same layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from lwm_jax.config import ModelConfig, to_dict
from lwm_jax.errors import UserError
from lwm_jax.model.digest import check_digests, host_digest, tree_digests
from lwm_jax.model.llama import Llama
from lwm_jax.outputs import check_output_dir, staged_folder
from lwm_jax.parallel.mesh import state_shardings

FORMAT = "lwm-jax/1"
PENDING = "pending"  # the digests of a lazily written checkpoint, until its last leaf is on disk


def model_metadata(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The metadata stored beside params: the model config and its RoPE theta, plus `extra`."""
    return {"format": FORMAT, "model": to_dict(config), "rope_theta": config.rope_theta,
            "max_position_embeddings": config.max_position_embeddings, **extra}


def save_model(path: str | Path, model: Llama, metadata: dict[str, Any], step: int = 0,
               overwrite: bool = False) -> Path:
    """Writes `model`'s params and `metadata` as step `step` of the checkpoint at `path`."""
    path = check_new_checkpoint(path, overwrite)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    metadata = {**metadata, "digests": {"params": tree_digests(params)}}
    with staged_folder(path) as stage, ocp.CheckpointManager(stage) as manager:
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave(metadata)), force=True)
        manager.wait_until_finished()
    return path


def check_new_checkpoint(path: str | Path, overwrite: bool) -> Path:
    """The absolute path of a checkpoint about to be written: new or empty (or `overwrite`), and
    writable (`check_output_dir`)."""
    path = Path(path).absolute()
    if path.exists() and path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{path} already exists and is not empty; choose a new path or pass --force")
    return check_output_dir(path, "checkpoint folder")


def _not_a_checkpoint(path: Path) -> UserError:
    """The error for a folder that holds no checkpoint step, pointing from a train workdir (or one of
    its stage folders) to its checkpoint folders."""
    stages = sorted(p.parent.name for p in path.glob("stages/*/checkpoints"))
    if stages or (path / "recipe.json").is_file():
        where = f"{path}/stages/NAME/checkpoints" + (f" (NAME: {', '.join(stages)})" if stages else "")
        return UserError(f"{path} is a train workdir, not a checkpoint: its checkpoints are in {where}")
    if (path / "checkpoints").is_dir():
        return UserError(f"{path} holds no checkpoint steps; its stage's checkpoints are in {path / 'checkpoints'}")
    return UserError(f"{path} holds no orbax checkpoint steps (expected a folder made by import-hf, or "
                     "WORKDIR/stages/NAME/checkpoints of a train run)")


def _manager_and_step(path: str | Path, step: int | None):
    path = Path(path).absolute()
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist (expected a folder made by import-hf or train)")
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is a file, not a checkpoint folder (made by import-hf or train)")
    manager = ocp.CheckpointManager(path)
    steps = manager.all_steps()
    if not steps:
        manager.close()
        raise _not_a_checkpoint(path)
    if step is None:
        step = max(steps)
    elif step not in steps:
        manager.close()
        raise UserError(f"{path} has no step {step} (available: {sorted(steps)})")
    return manager, step


@contextlib.contextmanager
def reading_checkpoint(where: str | Path) -> Iterator[None]:
    """Turns a failure to read the checkpoint part `where` (a step's `params`, `metadata`, ...) into
    one `UserError` naming it and the innermost cause: orbax wraps tensorstore's and json's errors,
    and the innermost one names the file and what is wrong with it."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # orbax raises bare Exception around tensorstore's ValueError
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        lines = str(cause).strip().splitlines()
        raise UserError(f"checkpoint {where} is damaged or unreadable ({type(cause).__name__}: "
                        f"{lines[0] if lines else 'no detail'})") from err


def read_metadata(path: str | Path, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint step (latest by default)."""
    manager, step = _manager_and_step(path, step)
    with manager, reading_checkpoint(Path(path).absolute() / str(step) / "metadata"):
        restored = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        metadata = restored["metadata"]
        where = Path(path).absolute() / str(step)
        if not isinstance(metadata, dict) or "model" not in metadata:
            raise UserError(f"checkpoint {where / 'metadata'} holds no model config (not written by lwm-jax, "
                            "or damaged)")
        if metadata.get("digests") == PENDING:
            raise UserError(f"checkpoint {where} was never finished (its content digests were not written); "
                            "write it again")
        return dict(metadata)


def params_target(config: ModelConfig, mesh: Mesh | None) -> dict:
    """Abstract params (pure dict of ShapeDtypeStruct) with the shardings they restore into."""
    abstract = nnx.state(nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0))))
    if mesh is not None:
        shardings = jax.tree.leaves(nnx.to_pure_dict(state_shardings(mesh, abstract)))
    else:
        shardings = [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(jax.tree.leaves(abstract))
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(abstract))
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, shardings)])


def params_digests(metadata: dict[str, Any]) -> dict[str, list[int]] | None:
    """The params' content digests a checkpoint's metadata carries (None: written without them)."""
    digests = metadata.get("digests")
    return digests.get("params") if isinstance(digests, dict) else None


def restore_params(path: str | Path, config: ModelConfig, mesh: Mesh | None = None,
                   step: int | None = None) -> dict:
    """Params (pure dict) of a checkpoint step, sharded for `mesh`, checked against the digests
    written with them (a UserError naming the damaged array)."""
    metadata = read_metadata(path, step)
    manager, step = _manager_and_step(path, step)
    where = Path(path).absolute() / str(step) / "params"
    with manager, reading_checkpoint(where):
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params_target(config, mesh))))
    check_digests(tree_digests(restored["params"]), params_digests(metadata), where)
    return restored["params"]


def merge_params(config: ModelConfig, params: dict) -> Llama:
    """A `Llama` module holding `params` (a pure dict)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def read_hf_config(hf_dir: str | Path, **runtime) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face Llama folder's `config.json` (`runtime`: run-only fields)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a directory (expected a Hugging Face model folder)")
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{hf_dir} has no config.json (expected a Hugging Face Llama model folder)")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file} is not valid JSON: {err}") from None
    return ModelConfig.from_hf(hf, **runtime)


# Leaf by leaf: checkpoints of models larger than the host's memory ------------------------------


class LazyLeaf:
    """A param leaf made (`make() -> numpy array`) only when the checkpoint writer reaches it; `key`
    (its key path, set by `save_lazy_params`) names its digest."""

    def __init__(self, make: Callable[[], np.ndarray], shape: tuple[int, ...], dtype, sharding):
        self.make, self.shape, self.dtype, self.sharding = make, tuple(shape), np.dtype(dtype), sharding
        self.size = int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize
        self.key = ""


class _LeafByLeafHandler(ocp.type_handlers.TypeHandler):
    """Writes `LazyLeaf`s one at a time through orbax's own jax.Array handler: each leaf is made,
    written and freed before the next is made, and the files are those of a plain jax.Array save."""

    def __init__(self):
        self._array = ocp.type_handlers.get_type_handler(jax.Array)
        self.digests: dict[str, list[int]] = {}

    def typestr(self) -> str:
        return self._array.typestr()

    async def metadata(self, infos):
        return await self._array.metadata(infos)

    async def deserialize(self, infos, args=None):
        return await self._array.deserialize(infos, args)

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        for value, info, arg in zip(values, infos, args):
            host = value.make()
            self.digests[value.key] = host_digest(host)
            array = jax.device_put(host, value.sharding)
            del host
            for commit in await self._array.serialize([array], [info], [arg]):
                await asyncio.to_thread(commit.result)  # on disk before the next leaf is made
            del array
        return []


def save_lazy_params(path: str | Path, params: dict, metadata: dict[str, Any], step: int = 0,
                     overwrite: bool = False) -> Path:
    """Writes `params` (a pure dict of `LazyLeaf`) and `metadata` as step `step` of the checkpoint
    at `path`, holding one leaf in memory at a time; `restore_params` reads it like `save_model`'s."""
    path = check_new_checkpoint(path, overwrite)
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        leaf.key = jax.tree_util.keystr(key_path)
    array = ocp.type_handlers.get_type_handler(jax.Array)  # listed too: orbax then records array metadata
    lazy = _LeafByLeafHandler()
    registry = ocp.type_handlers.create_type_handler_registry((jax.Array, array), (LazyLeaf, lazy))
    # Uncompressed: tensorstore buffers a leaf's compressed chunks beside the leaf until it commits,
    # close to one more copy of it; restore reads either (the codec is in each array's metadata).
    handlers = {"params": ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False),
                "metadata": ocp.JsonCheckpointHandler()}
    with staged_folder(path) as stage:
        with ocp.CheckpointManager(stage, item_handlers=handlers) as manager:
            manager.save(step, args=ocp.args.Composite(
                params=ocp.args.PyTreeSave(params), metadata=ocp.args.JsonSave({**metadata, "digests": PENDING})),
                force=True)
            manager.wait_until_finished()
        # The digests are known once every leaf was made: written into the committed metadata last, so
        # a checkpoint still marked PENDING never finished.
        _rewrite_json(stage / str(step) / "metadata" / "metadata", {**metadata, "digests": {"params": lazy.digests}})
    return path


def _rewrite_json(path: Path, data: dict) -> None:
    """Replaces the JSON file `path` with `data` (written beside it, then renamed over it)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data))
    temporary.replace(path)


def iter_params(path: str | Path, config: ModelConfig, step: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(dotted param path, host array)` for every param leaf of a checkpoint step, restoring
    one leaf at a time (the others are orbax placeholders, never read). Close it when done early
    (`contextlib.closing`): it holds an orbax manager open between leaves."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params_target(config, None))
    digests = params_digests(read_metadata(path, step))
    manager, step = _manager_and_step(path, step)
    where = Path(path).absolute() / str(step) / "params"
    with manager:
        for i, (key_path, leaf) in enumerate(flat):
            def only(value, i=i):
                return treedef.unflatten([value if j == i else ocp.PLACEHOLDER for j in range(len(flat))])
            with reading_checkpoint(Path(path).absolute() / str(step) / "params"):
                restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
                    only(leaf), restore_args=only(ocp.RestoreArgs(restore_type=np.ndarray)))))["params"]
            value = treedef.flatten_up_to(restored)[i]  # read by tensorstore straight into numpy
            del restored
            key = jax.tree_util.keystr(key_path)
            if digests is not None:
                check_digests({key: host_digest(value)}, {key: digests[key]}, where)
            yield ".".join(str(k.key) for k in key_path), value
            del value
