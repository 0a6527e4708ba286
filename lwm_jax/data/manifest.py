"""The manifest of a prepared dataset (`manifest.json`): seq_len, tokenizer hash, seed, per-source
documents/tokens/sequences and shard files, skipped-input counts. Written last by `prepare`, so a
folder without one is an unfinished run; read and checked (every shard opened and its records counted,
so a truncated or corrupted shard is named before training or evaluation starts, and one record's
length compared with seq_len) by its readers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from array_record.python.array_record_module import ArrayRecordReader

from lwm_jax.data.packing import decode_record
from lwm_jax.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "lwm-jax-prepared"
VERSION = 1


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """Writes `manifest.json` atomically (temporary file, then rename)."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_manifest(directory: str | Path) -> dict:
    """The checked manifest of a prepared dataset, with shard paths made absolute."""
    directory = Path(directory).expanduser()
    path = directory / MANIFEST
    if directory.exists() and not directory.is_dir():
        raise UserError(f"prepared dataset {directory} is a file, not a folder (make one with `lwm-jax data prepare`)")
    if not directory.is_dir():
        raise UserError(f"prepared dataset {directory} does not exist (make it with `lwm-jax data prepare`)")
    if not path.is_file():
        raise UserError(f"{directory} has no {MANIFEST}: not a prepared dataset, or `lwm-jax data prepare` "
                        "did not finish there")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not readable JSON: {err}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r} is not "
                        f"{FORMAT!r} version {VERSION}; re-run `lwm-jax data prepare`")
    for name, source in manifest["sources"].items():
        shards = [str(directory / s) for s in source["shards"]]
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise UserError(f"prepared dataset {directory}: shard {missing[0]} of source {name!r} is missing")
        counts = [shard_records(s) for s in shards]
        if sum(counts) != source["sequences"]:
            raise UserError(f"prepared dataset {directory}: the shards of source {name!r} hold {sum(counts):,} "
                            f"records but {MANIFEST} lists {source['sequences']:,} sequences; re-run "
                            "`lwm-jax data prepare`")
        source["shard_paths"] = shards
        source["shard_records"] = counts
    _check_record_length(directory, manifest)
    return manifest


def _check_record_length(directory: Path, manifest: dict) -> None:
    """Reads the first record and checks that it holds the `seq_len + 1` tokens the manifest says
    (a manifest copied or edited beside other shards would pass the counts and fail in training)."""
    seq_len = manifest.get("seq_len")
    for source in manifest["sources"].values():
        for path, count in zip(source["shard_paths"], source["shard_records"]):
            if not count:
                continue
            try:
                reader = ArrayRecordReader(path)
                tokens = decode_record(reader.read([0])[0]).tokens.size
                reader.close()
            except (RuntimeError, OSError, IndexError, ValueError) as err:
                raise shard_error(path, err) from None
            if tokens != seq_len + 1:
                raise UserError(f"prepared dataset {directory}: its records hold {tokens:,} tokens but {MANIFEST} "
                                f"says seq_len {seq_len:,} (records of {seq_len + 1:,}); the manifest does not "
                                "belong to these shards: re-run `lwm-jax data prepare`")
            return


def shard_error(path: str | Path, err: Exception) -> UserError:
    """The one-line error for a prepared shard that array_record cannot read (`err`: its exception)."""
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return UserError(f"prepared shard {path} ({size:,} bytes) is truncated or corrupted: {reason}; re-run "
                     "`lwm-jax data prepare`")


def shard_records(path: str | Path) -> int:
    """The number of records of an array_record shard; a `shard_error` when it cannot be opened."""
    try:
        reader = ArrayRecordReader(str(path))
    except (RuntimeError, OSError) as err:
        raise shard_error(path, err) from None
    try:
        if not reader.ok():  # a damaged file opens lazily: reading is what reports why
            reader.read([0])
            raise RuntimeError("array_record could not open it")
        count = reader.num_records()
        reader.close()  # also raises on a damaged file
    except (RuntimeError, OSError, IndexError) as err:
        raise shard_error(path, err) from None
    return count
