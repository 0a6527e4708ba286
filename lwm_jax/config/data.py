"""Typed settings of the data pipeline: `PrepareConfig` (how raw text becomes packed shards) and
`DataConfig` (how training reads them: which prepared sets, mixture weights, chat ratio, packing mode).
Both are frozen and validated on construction, so a bad value fails before any file is read.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from lwm_jax.config.schema import apply_overrides, check, from_dict, load_yaml

PACKING_MODES = ("continuous", "document")


def _positive_int(name: str, value: Any) -> None:
    check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           f"{name}={value!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Options of `lwm-jax data prepare`: record fields, length filter, packing length, workers."""

    seq_len: int
    seed: int = 0
    text_key: str = "text"
    messages_key: str = "messages"
    source_key: str = "meta.redpajama_set_name"  # dotted path inside a record
    default_source: str = "default"  # text records without a source name
    chat_source: str = "chat"  # chat records (rendered with the chat template)
    min_doc_tokens: int = 4096  # text documents this long (content tokens) are always kept ...
    short_keep_prob: float = 0.5  # ... shorter ones with this probability (Fu et al. 2024)
    workers: int = 0  # grain worker processes tokenizing; 0 = threads in this process
    shard_tokens: int = 1 << 28  # tokens per array_record shard before a new one starts

    def __post_init__(self):
        _positive_int("seq_len", self.seq_len)
        check(isinstance(self.seed, int) and 0 <= self.seed < 2**32,
               f"seed={self.seed!r} must be an integer in [0, 2**32)")
        for name in ("text_key", "messages_key", "source_key", "default_source", "chat_source"):
            value = getattr(self, name)
            check(isinstance(value, str) and value.strip() != "", f"{name}={value!r} must be a non-empty string")
        check(isinstance(self.min_doc_tokens, int) and self.min_doc_tokens >= 0,
               f"min_doc_tokens={self.min_doc_tokens!r} must be an integer >= 0")
        check(isinstance(self.short_keep_prob, (int, float)) and 0.0 <= self.short_keep_prob <= 1.0,
               f"short_keep_prob={self.short_keep_prob!r} must be a probability in [0, 1]")
        check(isinstance(self.workers, int) and 0 <= self.workers <= 256,
               f"workers={self.workers!r} must be an integer in [0, 256] (0 = tokenize in this process)")
        check(isinstance(self.shard_tokens, int) and self.shard_tokens >= self.seq_len + 1,
               f"shard_tokens={self.shard_tokens!r} must be an integer >= seq_len+1={self.seq_len + 1}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What training reads: prepared datasets, per-source weights, chat ratio and packing mode.

    `paths` may contain `{seq_len}`, replaced by the stage's sequence length, so one recipe line
    (`data/slimpajama-{seq_len}`) serves every stage.
    """

    paths: tuple[str, ...] = ()
    weights: dict[str, float] | None = None  # text sources; None = SlimPajama's published mixture
    chat_ratio: float = 0.0  # share of sequences drawn from chat sources
    packing: str = "continuous"  # "continuous": positions 0..seq_len, no document mask; "document"
    shuffle: bool = True
    read_threads: int = 2
    prefetch_batches: int = 2

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        object.__setattr__(self, "paths", paths)
        for i, p in enumerate(paths):
            check(isinstance(p, str) and p.strip() != "", f"paths[{i}]={p!r} must be a non-empty path")
        if self.weights is not None:
            check(isinstance(self.weights, dict) and self.weights,
                   f"weights={self.weights!r} must be a non-empty mapping source name -> weight (or null)")
            clean = {}
            for name, w in self.weights.items():
                check(isinstance(name, str) and name != "", f"weights key {name!r} must be a source name")
                check(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0,
                       f"weights.{name}={w!r} must be a number >= 0")
                clean[name] = float(w)
            check(sum(clean.values()) > 0, f"weights={clean} must not all be zero")
            object.__setattr__(self, "weights", clean)
        check(isinstance(self.chat_ratio, (int, float)) and 0.0 <= self.chat_ratio <= 1.0,
               f"chat_ratio={self.chat_ratio!r} must be in [0, 1]")
        check(self.packing in PACKING_MODES, f"packing={self.packing!r} is not one of {PACKING_MODES}")
        check(isinstance(self.shuffle, bool), f"shuffle={self.shuffle!r} must be true or false")
        check(isinstance(self.read_threads, int) and 0 <= self.read_threads <= 64,
               f"read_threads={self.read_threads!r} must be an integer in [0, 64]")
        _positive_int("prefetch_batches", self.prefetch_batches)

    def __hash__(self) -> int:  # frozen, but `weights` is a dict: hash its sorted items
        weights = None if self.weights is None else tuple(sorted(self.weights.items()))
        return hash((self.paths, weights, self.chat_ratio, self.packing, self.shuffle, self.read_threads,
                     self.prefetch_batches))

    @property
    def document_mask(self) -> bool:
        """True when attention must not cross documents (pass `segment_ids` to attention)."""
        return self.packing == "document"

    def resolved_paths(self, seq_len: int) -> list[Path]:
        """The prepared-dataset directories with `{seq_len}` filled in."""
        check(bool(self.paths), "data.paths is empty: name at least one prepared dataset directory "
                                 "(made by `lwm-jax data prepare`)")
        return [Path(p.replace("{seq_len}", str(seq_len))).expanduser() for p in self.paths]

    def replace(self, **changes) -> DataConfig:
        return dataclasses.replace(self, **changes)


def load_data_config(path: str | Path, overrides: list[str] = ()) -> DataConfig:
    """Loads a YAML mapping of DataConfig fields, or the `data:` section of a recipe, with `key=value`
    overrides (dotted from the top of the file: `data.chat_ratio=0.1` in a recipe)."""
    data = apply_overrides(load_yaml(path), list(overrides))
    if isinstance(data.get("data"), dict):
        data = data["data"]
    return from_dict(DataConfig, data, "data")
