"""The training input pipeline on grain: prepared per-source shards, shuffled per source, mixed by
weight, expanded into examples, batched as one global stream of which each process reads its own
rows; a checkpointable iterator and the helper that makes global jax Arrays from per-process batches.

Global batch g is rows [g*B, (g+1)*B) of the mixed stream; process p of P reads rows
[g*B + p*B/P, g*B + (p+1)*B/P). The stream does not depend on P, so the iterator state (the number
of batches read) restores exactly, even onto a different process count.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import threading
import zlib
from typing import Any

import grain
import jax
import numpy as np

from lwm_jax.config import DataConfig
from lwm_jax.data.manifest import load_manifest, shard_error
from lwm_jax.data.mixture import resolve_weights
from lwm_jax.data.packing import decode_record, examples_batch
from lwm_jax.errors import UserError

STATE_VERSION = 1
_ENDLESS = 2**40  # length of a repeated source: endless in practice (10^18 tokens at 1M per sequence),
# small enough that grain's mix (length / weight) and batch (ceil(length / size)) stay exact


def load_prepared(config: DataConfig, seq_len: int) -> tuple[dict[str, dict], str]:
    """Sources of every prepared dataset in `config.paths` (merged by name) and the tokenizer hash.

    Checks that each was prepared at `seq_len` with the same tokenizer.
    """
    sources: dict[str, dict] = {}
    tokenizer_sha = None
    for directory in config.resolved_paths(seq_len):
        manifest = load_manifest(directory)
        if manifest["seq_len"] != seq_len:
            raise UserError(f"prepared dataset {directory} has seq_len={manifest['seq_len']} but training uses "
                            f"seq_len={seq_len}; prepare it with `lwm-jax data prepare ... --seq-len {seq_len}`")
        sha = manifest["tokenizer"]["sha256"]
        if tokenizer_sha not in (None, sha):
            raise UserError(f"prepared dataset {directory} used a different tokenizer (sha256 {sha[:12]}...) "
                            f"than {config.paths[0]} ({tokenizer_sha[:12]}...)")
        tokenizer_sha = sha
        for name, src in manifest["sources"].items():
            if name in sources:
                if sources[name]["kind"] != src["kind"]:
                    raise UserError(f"source {name!r} is {src['kind']} in {directory} but "
                                    f"{sources[name]['kind']} elsewhere")
                merged = sources[name]
                for key in ("documents", "content_tokens", "kept_documents", "kept_tokens", "sequences",
                            "padding_tokens"):
                    merged[key] += src[key]
                merged["shard_paths"] = merged["shard_paths"] + src["shard_paths"]
                merged["shard_records"] = merged["shard_records"] + src["shard_records"]
            else:
                sources[name] = dict(src)
    return sources, tokenizer_sha


class ShardSource:
    """The records of array_record shards as one random-access source (what `grain.MapDataset.source`
    takes); a read error (a shard damaged after it was opened) becomes a UserError naming the shard."""

    def __init__(self, paths: list[str], records: list[int]):
        self._source = grain.sources.ArrayRecordDataSource(list(paths))
        self._paths = list(paths)
        self._ends = list(itertools.accumulate(records))

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"ShardSource({len(self._paths)} shards)"

    def __getitem__(self, index: int) -> bytes:
        try:
            return self._source[index]
        except RuntimeError as err:  # array_record reports damage as RuntimeError
            shard = min(bisect.bisect_right(self._ends, int(index)), len(self._paths) - 1)
            raise shard_error(self._paths[shard], err) from None


def _seed(seed: int, name: str) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


class EpochShuffle(grain.MapDataset):
    """The parent repeated forever, each epoch in a fresh seeded permutation.

    Like `shuffle(seed).repeat()`, but the permutation of an epoch is drawn once with numpy and
    cached: grain's per-index Feistel shuffle costs about a millisecond per index on the small
    datasets that long sequences make (a few thousand records per source).
    """

    def __init__(self, parent: grain.MapDataset, seed: int, shuffle: bool = True):
        super().__init__(parent)
        self._seed = seed
        self._shuffle = shuffle
        self._n = len(parent)
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return _ENDLESS

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed}, shuffle={self._shuffle})"

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
                self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
                self._cache[epoch] = perm
            return perm

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), self._n)
        return self._parent[int(self._permutation(epoch)[i]) if self._shuffle else i]


class _BatchDecode:
    """grain batch_fn: packed record bytes (or (source index, bytes)) -> one batch of examples."""

    def __init__(self, packing: str, with_source: bool):
        self.packing = packing
        self.with_source = with_source

    def __call__(self, elements: list) -> dict[str, np.ndarray]:
        if not self.with_source:
            return examples_batch([decode_record(e) for e in elements], self.packing)
        batch = examples_batch([decode_record(e[1]) for e in elements], self.packing)
        batch["source"] = np.asarray([e[0] for e in elements], dtype=np.int32)
        return batch


def _tag(index: int, data: bytes) -> tuple[int, bytes]:
    return index, data


def _resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not (isinstance(process_count, int) and process_count >= 1 and 0 <= process_index < process_count):
        raise UserError(f"process_index={process_index} must be in [0, process_count={process_count})")
    return process_index, process_count


def build_dataset(config: DataConfig, *, seq_len: int, global_batch_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None,
                  with_source: bool = False) -> tuple[grain.IterDataset, dict]:
    """This process's grain dataset of batches `[global_batch_size // process_count, seq_len + 1]`
    and the pipeline's fingerprint (what a saved iterator state must match).

    `with_source` adds a `source` array (index into the fingerprint's sorted source names).
    `process_index`/`process_count` default to JAX's; when sequence parallelism spans processes,
    pass the data-parallel group index and count instead (processes of one group read the same rows).
    """
    process_index, process_count = _resolve_process(process_index, process_count)
    if not (isinstance(global_batch_size, int) and global_batch_size >= 1):
        raise UserError(f"global_batch_size={global_batch_size!r} must be a positive integer")
    if global_batch_size % process_count:
        raise UserError(f"global_batch_size={global_batch_size} must be divisible by the number of data "
                        f"shards (processes) {process_count}")
    sources, tokenizer_sha = load_prepared(config, seq_len)
    weights = resolve_weights(sources, config.weights, config.chat_ratio)
    names = sorted(weights)
    parts = []
    for i, name in enumerate(names):
        ds = grain.MapDataset.source(ShardSource(sources[name]["shard_paths"], sources[name]["shard_records"]))
        ds = EpochShuffle(ds, _seed(seed, name), config.shuffle)
        if with_source:
            ds = ds.map(functools.partial(_tag, i))
        parts.append(ds)
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [weights[n] for n in names])
    local_batch = global_batch_size // process_count
    batch_fn = _BatchDecode(config.packing, with_source)
    ds = mixed.batch(local_batch, batch_fn=batch_fn)[process_index::process_count]
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                   prefetch_buffer_size=config.prefetch_batches))
    fingerprint = {
        "seq_len": seq_len, "global_batch_size": global_batch_size, "seed": seed, "packing": config.packing,
        "shuffle": config.shuffle, "tokenizer_sha256": tokenizer_sha,
        "sources": {n: {"weight": round(weights[n], 9), "sequences": sources[n]["sequences"]} for n in names},
    }
    return iter_ds, fingerprint


class TrainIterator:
    """Iterator of per-process numpy batches with a checkpointable state.

    `get_state()` returns JSON bytes (the batches read plus the pipeline fingerprint); `set_state`
    accepts them (or the decoded dict) and refuses a state saved by a different pipeline. The bytes
    form also suits grain's orbax handler (`grain.checkpoint.CheckpointSave(iterator)`).
    """

    def __init__(self, dataset: grain.IterDataset, fingerprint: dict, process_index: int, process_count: int):
        self._iter = iter(dataset)
        self.fingerprint = fingerprint
        self.process_index = process_index
        self.process_count = process_count

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> bytes:
        state = {"version": STATE_VERSION, "grain": self._iter.get_state(), "fingerprint": self.fingerprint}
        return json.dumps(state, sort_keys=True).encode()

    def set_state(self, state: bytes | str | dict) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if state.get("version") != STATE_VERSION:
            raise UserError(f"data iterator state version {state.get('version')!r} is not {STATE_VERSION}")
        saved = state["fingerprint"]
        diff = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if diff:
            details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {self.fingerprint.get(k)!r}" for k in diff)
            raise UserError(f"data iterator state belongs to a different pipeline ({details})")
        self._iter.set_state(state["grain"])

    def start_prefetch(self) -> None:
        if hasattr(self._iter, "start_prefetch"):
            self._iter.start_prefetch()

    def close(self) -> None:
        if hasattr(self._iter, "close"):
            self._iter.close()


def build_iterator(config: DataConfig, *, seq_len: int, global_batch_size: int, seed: int,
                   process_index: int | None = None, process_count: int | None = None) -> TrainIterator:
    """The training iterator: this process's batches of `tokens`, `segment_ids`, `positions` (int32)
    and `loss_weights` (float32), each `[global_batch_size // process_count, seq_len + 1]`."""
    process_index, process_count = _resolve_process(process_index, process_count)
    dataset, fingerprint = build_dataset(config, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                                         process_index=process_index, process_count=process_count)
    return TrainIterator(dataset, fingerprint, process_index, process_count)


def make_global_batch(local_batch: dict[str, np.ndarray], sharding: Any, *,
                      global_batch_size: int | None = None, batch_axis: int = 0) -> dict[str, Any]:
    """Global `jax.Array`s from this process's rows via `jax.make_array_from_process_local_data`.

    `sharding` is one `NamedSharding` for every array or a dict of them per key. Give
    `global_batch_size` when processes that share rows (sequence parallelism across hosts) each
    pass the same rows; by default the global batch is the per-process rows times the processes
    that hold distinct rows, as JAX infers it. Shard the sequence axis only after
    `packing.split_inputs_targets` (seq_len divides evenly, seq_len + 1 does not). `batch_axis`: the
    axis of the rows (1 for training's `[grad_accum, batch, seq]`).
    """
    out = {}
    for key, value in local_batch.items():
        s = sharding[key] if isinstance(sharding, dict) else sharding
        shape = None
        if global_batch_size is not None:
            shape = list(np.shape(value))
            shape[batch_axis] = global_batch_size
            shape = tuple(shape)
        out[key] = jax.make_array_from_process_local_data(s, np.asarray(value), shape)
    return out
