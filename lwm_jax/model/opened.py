"""A checkpoint opened for use: what every command that reads a model (generate, the evaluations,
the converters) needs to know about it, decided once and in one place: its config as it runs here,
its trained length, its stop tokens and the attention it runs with on the given mesh.

Opening reads only the metadata, so a command checks its inputs against the checkpoint before any
weight is read; `model()` restores the params onto the mesh, `iter_params()` one leaf at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from lwm_jax.attention.layout import check_mesh
from lwm_jax.config import RUN_FIELDS, ModelConfig, from_dict
from lwm_jax.data.tokenize import EOT_TOKEN
from lwm_jax.model.context import check_context
from lwm_jax.model.llama import Llama
from lwm_jax.model.store import iter_params, merge_params, read_metadata, restore_params
from lwm_jax.parallel.mesh import seq_shards


def attention_for(saved: str, mesh: Mesh | None, requested: str | None = None) -> str:
    """The attention a checkpoint saved with `saved` runs with on `mesh`: the one requested; else
    `ring` wherever the mesh shards the sequence; else the saved one, except that a `ring`
    checkpoint runs `blockwise` (the same attention over one sequence shard)."""
    if requested is not None:
        return requested
    if seq_shards(mesh) > 1:
        return "ring"
    return "blockwise" if saved == "ring" else saved


@dataclasses.dataclass(frozen=True)
class OpenedCheckpoint:
    """One step of a model checkpoint: its metadata and its config as it runs on `mesh`."""

    path: Path
    step: int | None
    metadata: dict[str, Any]
    config: ModelConfig
    mesh: Mesh | None

    @property
    def trained_length(self) -> int:
        """The length the checkpoint was trained at (its `max_position_embeddings`)."""
        return int(self.metadata["max_position_embeddings"])

    @property
    def rope_theta(self) -> float:
        return float(self.metadata["rope_theta"])

    def stop_ids(self, tokenizer=None, *extra: int) -> tuple[int, ...]:
        """The token ids that end a generated turn: the model's EOS ids, `extra` ones (a tokenizer's
        own EOS) and, given its tokenizer, `<|eot_id|>` (sorted, without repeats)."""
        stop = set(self.config.eos_token_id or ()) | {int(i) for i in extra if i is not None}
        eot = tokenizer.token_to_id(EOT_TOKEN) if tokenizer is not None else None
        if eot is not None:
            stop.add(eot)
        return tuple(sorted(stop))

    def check_context(self, length: int, *, what: str, limit: int | None = None, warn: bool = True) -> bool:
        """`model.context.check_context` against this checkpoint's trained length."""
        return check_context(length, self.trained_length, what=what, limit=limit, warn=warn)

    def model(self) -> Llama:
        """The model with its params restored onto the mesh (one device without one)."""
        return merge_params(self.config, restore_params(self.path, self.config, self.mesh, self.step))

    def iter_params(self) -> Iterator[tuple[str, np.ndarray]]:
        """`(dotted param path, host array)` for every param leaf, one leaf in memory at a time."""
        return iter_params(self.path, self.config, self.step)


def open_checkpoint(ckpt: str | Path, mesh: Mesh | None = None, *, step: int | None = None,
                    **overrides: Any) -> OpenedCheckpoint:
    """Opens step `step` (the latest by default) of checkpoint `ckpt` to run on `mesh`.

    `overrides` change how the model runs (`RUN_FIELDS`: dtype, attention, kernel, ...), never what it
    computes; None values are ignored. The attention is `attention_for` the saved one and the mesh.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - set(RUN_FIELDS))
    if unknown:
        raise ValueError(f"cannot override {unknown} when opening a checkpoint (run-only fields: {RUN_FIELDS})")
    metadata = read_metadata(ckpt, step)
    config = from_dict(ModelConfig, metadata["model"])
    overrides["attention"] = attention_for(config.attention, mesh, overrides.get("attention"))
    config = config.replace(**overrides)
    if metadata.get("max_position_embeddings") is not None:
        config = config.replace(max_position_embeddings=int(metadata["max_position_embeddings"]))
    check_mesh(config.attention, mesh)
    return OpenedCheckpoint(Path(ckpt), step, metadata, config, mesh)
