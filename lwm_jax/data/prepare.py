"""`lwm-jax data prepare`: reads raw inputs once, tokenizes them in grain workers, packs each
source into seq_len+1 sequences and writes per-source array_record shards plus a manifest, so
training reads finished sequences and never waits on tokenization.
"""

from __future__ import annotations

import collections
import re
import time
from pathlib import Path

import grain
from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter

from lwm_jax import __version__
from lwm_jax.config import PrepareConfig
from lwm_jax.data.manifest import FORMAT, MANIFEST, VERSION, write_manifest
from lwm_jax.data.packing import SequencePacker
from lwm_jax.data.sources import SKIP_REASONS, plan_inputs
from lwm_jax.data.tokenize import TokenizeUnit, load_tokenizer_info
from lwm_jax.errors import UserError
from lwm_jax.outputs import check_output_dir, staged_folder
from lwm_jax.progress import progress as report

SHARD_DIR = "shards"
WRITER_OPTIONS = "group_size:1,uncompressed"  # one sequence per chunk, no decompression: fast random reads


class _ShardWriter:
    """array_record shards of one source, a new file every `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, stem: str, shard_tokens: int):
        self.out_dir, self.stem, self.shard_tokens = out_dir, stem, shard_tokens
        self.files: list[str] = []
        self._writer = None
        self._tokens = 0

    def write(self, record: bytes, tokens: int) -> None:
        if self._writer is None or self._tokens >= self.shard_tokens:
            self.close()
            name = f"{SHARD_DIR}/{self.stem}-{len(self.files):05d}.array_record"
            self._writer = ArrayRecordWriter(str(self.out_dir / name), WRITER_OPTIONS)
            self.files.append(name)
            self._tokens = 0
        self._writer.write(record)
        self._tokens += tokens

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        ours = (out / MANIFEST).exists() or (out / SHARD_DIR).is_dir()
        if not overwrite:
            raise UserError(f"output folder {out} is not empty; pass --overwrite to replace a prepared dataset "
                            "there, or choose a new folder")
        if not ours:
            raise UserError(f"output folder {out} is not empty and holds no prepared dataset; refusing to "
                            "overwrite it (choose a new or empty folder)")


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which fail unless parsed (google/grain#1355)."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _stem(name: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "source"
    base, k = stem, 1
    while stem in taken:
        k += 1
        stem = f"{base}_{k}"
    taken.add(stem)
    return stem


class _SourceOutput:
    """One source's way out of `prepare`: its packer, its shard writer and its counts."""

    def __init__(self, name: str, kind: str, stem: str, out: Path, config: PrepareConfig, eos_id: int):
        self.name, self.kind = name, kind
        self.packer = SequencePacker(config.seq_len, eos_id, with_mask=kind == "chat")
        self.writer = _ShardWriter(out, stem, config.shard_tokens)
        self.record_tokens = config.seq_len + 1
        self.stats: collections.Counter = collections.Counter()

    def add(self, part: dict) -> int:
        """Packs and writes one unit's documents of this source; returns the tokens kept."""
        st = self.stats
        st["documents"] += part["documents"]
        st["content_tokens"] += part["content_tokens"]
        st["kept_documents"] += len(part["lengths"])
        st["kept_tokens"] += len(part["tokens"])
        for record in self.packer.add(part["tokens"], part["lengths"], part["mask"]):
            self.writer.write(record, self.record_tokens)
        return len(part["tokens"])

    def finish(self) -> dict:
        """Writes the packer's last sequence and returns the manifest entry of this source."""
        for record in self.packer.finish():
            self.writer.write(record, self.record_tokens)
        st = self.stats
        if self.packer.tokens_out != st["kept_tokens"]:  # packing must neither lose nor duplicate tokens
            raise RuntimeError(f"packing lost tokens for {self.name}: {st['kept_tokens']} in, "
                               f"{self.packer.tokens_out} out")
        return {"kind": self.kind, "documents": st["documents"], "content_tokens": st["content_tokens"],
                "kept_documents": st["kept_documents"], "kept_tokens": st["kept_tokens"],
                "sequences": self.packer.sequences, "padding_tokens": self.packer.padding,
                "shards": self.writer.files}


class _Outputs:
    """Every source's `_SourceOutput`, made when its first documents arrive: a source that holds both
    text and chat records is written as two (`name` and `name-chat`)."""

    def __init__(self, out: Path, config: PrepareConfig, eos_id: int):
        self.out, self.config, self.eos_id = out, config, eos_id
        self.by_key: dict[tuple[str, str], _SourceOutput] = {}
        self.stems: set[str] = set()

    def get(self, name: str, kind: str) -> _SourceOutput:
        key = (name, kind)
        if key not in self.by_key:
            taken = any(k[0] == name for k in self.by_key)
            shown = name if not taken else f"{name}-{kind}"
            self.by_key[key] = _SourceOutput(shown, kind, _stem(shown, self.stems), self.out, self.config, self.eos_id)
        return self.by_key[key]

    def close(self) -> None:
        for source in self.by_key.values():
            source.writer.close()


def _units(plan, info, config: PrepareConfig):
    """The tokenized units, in grain worker processes (`config.workers`) or threads."""
    ds = grain.MapDataset.source(list(plan.units)).map(TokenizeUnit(info, config))
    if config.workers > 0:
        _absl_flags_parsed()
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.workers, per_worker_buffer_size=1))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))


def prepare(inputs: list[str], tokenizer: str | Path, out: str | Path, config: PrepareConfig, *,
            overwrite: bool = False, progress: bool = False) -> dict:
    """Tokenizes and packs `inputs` into `out`; returns the manifest (also written to `out`).

    Checks the tokenizer, every input and the output folder (also that it can be written) before
    any work (`UserError`). Bad records and zero-byte or corrupt files are skipped and counted under
    `skipped`; inputs that leave no sequence at all are an error. The dataset is written under a
    temporary name beside `out` and moved there when complete (the manifest last), so a failed run
    leaves nothing and a rerun is not refused.
    """
    info = load_tokenizer_info(tokenizer)
    plan = plan_inputs(list(inputs))
    out = Path(out).expanduser()
    _check_out_dir(out, overwrite)
    check_output_dir(out, "--out")
    with staged_folder(out, last=(MANIFEST,)) as stage:
        manifest = _write_dataset(plan, info, stage, config, [str(i) for i in inputs], progress)
    return manifest


def _write_dataset(plan, info, out: Path, config: PrepareConfig, inputs: list[str], progress: bool) -> dict:
    """Tokenizes, packs and writes the shards and manifest of `plan` into the folder `out`."""
    (out / SHARD_DIR).mkdir()
    start = time.perf_counter()
    counts: collections.Counter = collections.Counter()
    outputs = _Outputs(out, config, info.eos_id)
    iterator = iter(_units(plan, info, config))
    try:
        results = report(iterator, "prepare (units)", total=len(plan.units)) if progress else iterator
        for result in results:
            counts.update(result["counts"])
            for (name, kind), part in result["sources"].items():
                outputs.get(name, kind).add(part)
        sources = {source.name: source.finish() for source in outputs.by_key.values()}
    finally:
        outputs.close()
        if hasattr(iterator, "close"):
            iterator.close()
    seconds = time.perf_counter() - start
    corrupt = sorted(k.split(":", 1)[1] for k in counts if k.startswith("corrupt_file:"))
    skipped = {r: counts.get(r, 0) for r in SKIP_REASONS}
    skipped["empty_files"] = len(plan.empty_files)
    _check_not_empty(sources, counts, skipped, len(plan.files), config)
    manifest = {
        "format": FORMAT, "version": VERSION, "lwm_jax_version": __version__,
        "seq_len": config.seq_len, "seed": config.seed, "pad_id": info.eos_id,
        "tokenizer": info.to_manifest(),
        "prepare_config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "inputs": inputs, "files": len(plan.files), "units": len(plan.units),
        "valid_records": counts.get("valid_records", 0), "skipped": skipped,
        "empty_files": list(plan.empty_files), "corrupt_files": corrupt,
        "sources": sources,
        "totals": {"kept_tokens": sum(s["kept_tokens"] for s in sources.values()),
                   "sequences": sum(s["sequences"] for s in sources.values()),
                   "seconds": round(seconds, 3)},
    }
    write_manifest(out, manifest)
    return manifest


def _check_not_empty(sources: dict, counts: collections.Counter, skipped: dict, files: int,
                     config: PrepareConfig) -> None:
    """Refuses a run that would write a dataset of no sequences (every input bad, or every document
    dropped), naming why."""
    if sum(s["sequences"] for s in sources.values()):
        return
    why = ", ".join(f"{k} {v:,}" for k, v in skipped.items() if v) or "nothing to skip"
    if not counts.get("valid_records", 0):
        raise UserError(f"none of the {files:,} input file(s) held a usable record (skipped: {why}); "
                        "nothing was written")
    raise UserError(f"all {counts['valid_records']:,} valid records were dropped (--min-doc-tokens "
                    f"{config.min_doc_tokens}, --short-keep-prob {config.short_keep_prob}); nothing was written")
