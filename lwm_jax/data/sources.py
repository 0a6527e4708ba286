"""Raw inputs: expands INPUT arguments (files, directories, globs, `NAME=PATTERN`) into work units
checked before any work starts, and reads each unit's records (jsonl, jsonl.zst, parquet,
pre-tokenized array_record), skipping and counting bad records instead of failing on them.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow
import pyarrow.parquet as pq
import zstandard
from array_record.python.array_record_module import ArrayRecordReader

from lwm_jax.config import PrepareConfig
from lwm_jax.errors import UserError

FORMATS = {".jsonl": "jsonl", ".jsonl.zst": "jsonl.zst", ".parquet": "parquet", ".array_record": "array_record"}
UNIT_BYTES = 32 << 20  # plain jsonl files are split into ranges of about this many bytes
UNIT_RECORDS = 8192  # pre-tokenized array_record files: documents per unit
_NAME_RE = re.compile(r"^([A-Za-z0-9_.:-]+)=(.+)$")

# Counters of skipped input, in the order the summary prints them.
SKIP_REASONS = ("empty_files", "corrupt_files", "invalid_utf8", "malformed_json", "missing_text", "empty_text",
                "malformed_messages", "bad_token_ids", "no_chat_template")


@dataclasses.dataclass(frozen=True)
class Doc:
    """One input document: `kind` "text" (payload str), "chat" (list of messages) or "tokens" (int32)."""

    kind: str
    source: str
    payload: Any


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    """A piece of one input file read by one worker: a byte range (jsonl), a row group (parquet),
    a record range (array_record) or the whole file (jsonl.zst)."""

    index: int
    path: str
    fmt: str
    source: str | None  # from NAME=PATTERN; wins over the record's own source name
    start: int = 0
    end: int = -1


@dataclasses.dataclass(frozen=True)
class InputPlan:
    """The checked inputs: work units in order, every file found, and the zero-byte files skipped."""

    units: tuple[WorkUnit, ...]
    files: tuple[str, ...]
    empty_files: tuple[str, ...]


def file_format(path: str) -> str | None:
    """The input format of a file name ("jsonl", "jsonl.zst", "parquet", "array_record") or None."""
    name = os.path.basename(path)
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext) or (ext == ".array_record" and ".array_record-" in name):
            return FORMATS[ext]
    return None


def _split_name(item: str) -> tuple[str | None, str]:
    match = _NAME_RE.match(item)
    if match and not os.path.exists(item):
        return match.group(1), match.group(2)
    return None, item


def _expand(pattern: str) -> list[str]:
    if any(c in pattern for c in "*?["):
        paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not paths:
            raise UserError(f"input {pattern!r} matched no files")
        return paths
    path = Path(pattern).expanduser()
    if path.is_dir():
        paths = sorted(str(p) for p in path.rglob("*") if p.is_file() and file_format(str(p)))
        if not paths:
            raise UserError(f"input directory {pattern} holds no {', '.join(FORMATS)} files")
        return paths
    if not path.exists():
        raise UserError(f"input {pattern}: no such file or directory")
    return [str(path)]


def _check_readable(path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise UserError(f"input {path} is not readable: {err.strerror or err}") from None


def _jsonl_ranges(path: str, size: int, unit_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about `unit_bytes` that start and end on line boundaries."""
    bounds = [0]
    with open(path, "rb") as f:
        while bounds[-1] + unit_bytes < size:
            f.seek(bounds[-1] + unit_bytes)
            f.readline()
            pos = f.tell()
            if pos >= size:
                break
            bounds.append(pos)
    bounds.append(size)
    return list(zip(bounds[:-1], bounds[1:]))


def plan_inputs(inputs: list[str], unit_bytes: int = UNIT_BYTES) -> InputPlan:
    """Expands and checks every input (exists, readable, known format) and cuts it into work units.

    Raises `UserError` on the first unusable input, before anything is tokenized or written.
    Zero-byte files are not an error: they are listed in `empty_files` and skipped.
    """
    if not inputs:
        raise UserError("no INPUT given: name jsonl, jsonl.zst, parquet or array_record files, directories or globs")
    seen: dict[str, str | None] = {}
    for item in inputs:
        name, pattern = _split_name(item)
        for path in _expand(pattern):
            fmt = file_format(path)
            if fmt is None:
                raise UserError(f"input {path}: unsupported file type (valid: {', '.join(FORMATS)}, "
                                "or NAME=PATTERN to name the source)")
            _check_readable(path)
            seen.setdefault(os.path.abspath(path), name)
    units: list[WorkUnit] = []
    empty: list[str] = []
    for path, name in seen.items():
        size = os.path.getsize(path)
        fmt = file_format(path)
        if size == 0:
            empty.append(path)
            continue
        if fmt == "jsonl":
            pieces = _jsonl_ranges(path, size, unit_bytes)
        elif fmt == "parquet":
            pieces = [(g, g + 1) for g in range(_parquet_row_groups(path))]
        elif fmt == "array_record":
            n = _array_record_len(path)
            pieces = [(a, min(a + UNIT_RECORDS, n)) for a in range(0, n, UNIT_RECORDS)]
        else:
            pieces = [(0, -1)]
        for start, end in pieces:
            units.append(WorkUnit(len(units), path, fmt, name, start, end))
    return InputPlan(tuple(units), tuple(seen), tuple(empty))


def _parquet_row_groups(path: str) -> int:
    try:
        return pq.ParquetFile(path).num_row_groups
    except Exception as err:  # pyarrow raises several types for a bad footer
        raise UserError(f"input {path} is not a readable parquet file: {str(err).splitlines()[0]}") from None


def _array_record_len(path: str) -> int:
    try:
        reader = ArrayRecordReader(path)
        n = reader.num_records()
        reader.close()
        return n
    except Exception as err:
        raise UserError(f"input {path} is not a readable array_record file: {str(err).splitlines()[0]}") from None


# Reading one unit -----------------------------------------------------------------------------------


def _get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def record_to_doc(obj: Any, cfg: PrepareConfig, source: str | None, counts: collections.Counter) -> Doc | None:
    """A parsed JSON object as a `Doc`, or None (counted) when it holds no usable text or messages."""
    if not isinstance(obj, dict):
        counts["malformed_json"] += 1
        return None
    if cfg.messages_key in obj:
        messages = obj[cfg.messages_key]
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages) and any(m["role"] == "assistant" for m in messages)
        if not ok:
            counts["malformed_messages"] += 1
            return None
        return Doc("chat", source or cfg.chat_source, messages)
    text = obj.get(cfg.text_key)
    if not isinstance(text, str):
        counts["missing_text"] += 1
        return None
    if not text.strip():
        counts["empty_text"] += 1
        return None
    if source is None:
        name = _get_path(obj, cfg.source_key)
        source = name if isinstance(name, str) and name else cfg.default_source
    return Doc("text", source, text)


def _parse_line(line: bytes, cfg: PrepareConfig, source: str | None, counts: collections.Counter) -> Doc | None:
    if not line.strip():
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        counts["invalid_utf8"] += 1
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        counts["malformed_json"] += 1
        return None
    return record_to_doc(obj, cfg, source, counts)


def _jsonl_lines(unit: WorkUnit) -> Iterator[bytes]:
    with open(unit.path, "rb") as f:  # units start and end on line boundaries
        f.seek(unit.start)
        yield from f.read(unit.end - unit.start).split(b"\n")


def _zst_lines(unit: WorkUnit) -> Iterator[bytes]:
    """Lines of a (multi-frame) zstd file; raises EOFError after the last whole line of a truncated one."""
    dctx = zstandard.ZstdDecompressor()
    obj, pending, carry = dctx.decompressobj(), False, b""
    with open(unit.path, "rb") as f:
        while chunk := f.read(1 << 20):
            while chunk:
                data = obj.decompress(chunk)
                pending, chunk = True, b""
                if obj.eof:  # a frame ended: the next one starts in its unused data
                    chunk = obj.unused_data
                    obj, pending = dctx.decompressobj(), False
                if data:
                    lines = (carry + data).split(b"\n")
                    carry = lines.pop()
                    yield from lines
    if pending and not obj.eof:
        raise EOFError(f"{unit.path}: zstd stream is truncated")
    if carry:
        yield carry


def _parquet_docs(unit: WorkUnit, cfg: PrepareConfig, counts: collections.Counter) -> Iterator[Doc | None]:
    table = pq.ParquetFile(unit.path).read_row_group(unit.start)
    names = set(table.column_names)
    wanted = [k for k in {cfg.text_key, cfg.messages_key, cfg.source_key.split(".")[0]} if k in names]
    columns = {k: table.column(k).to_pylist() for k in wanted}
    source_col = cfg.source_key.split(".")[0]
    for i in range(table.num_rows):
        obj = {k: v[i] for k, v in columns.items()}
        if cfg.messages_key in obj and obj[cfg.messages_key] is None:
            del obj[cfg.messages_key]
        if isinstance(obj.get(source_col), str) and "." in cfg.source_key:  # meta stored as a JSON string
            try:
                obj[source_col] = json.loads(obj[source_col])
            except ValueError:
                obj[source_col] = None
        yield record_to_doc(obj, cfg, unit.source, counts)


def _array_record_docs(unit: WorkUnit, cfg: PrepareConfig, vocab_size: int,
                       counts: collections.Counter) -> Iterator[Doc | None]:
    reader = ArrayRecordReader(unit.path)
    try:
        for data in reader.read(list(range(unit.start, unit.end))):
            if len(data) == 0:
                counts["empty_text"] += 1
                yield None
                continue
            if len(data) % 4:
                counts["bad_token_ids"] += 1
                yield None
                continue
            ids = np.frombuffer(data, dtype="<i4")
            if ids.min() < 0 or ids.max() >= vocab_size:
                counts["bad_token_ids"] += 1
                yield None
                continue
            yield Doc("tokens", unit.source or cfg.default_source, ids)
    finally:
        reader.close()


def _read_errors() -> tuple[type[BaseException], ...]:
    return (OSError, EOFError, RuntimeError, zstandard.ZstdError, pyarrow.ArrowException)


def read_unit(unit: WorkUnit, cfg: PrepareConfig, vocab_size: int, counts: collections.Counter) -> Iterator[Doc]:
    """Documents of one work unit; bad records and unreadable remainders are counted in `counts`."""
    try:
        if unit.fmt == "parquet":
            docs: Iterator[Doc | None] = _parquet_docs(unit, cfg, counts)
        elif unit.fmt == "array_record":
            docs = _array_record_docs(unit, cfg, vocab_size, counts)
        else:
            lines = _jsonl_lines(unit) if unit.fmt == "jsonl" else _zst_lines(unit)
            docs = (_parse_line(line, cfg, unit.source, counts) for line in lines)
        for doc in docs:
            if doc is not None:
                yield doc
    except _read_errors():  # a truncated or corrupt file: keep what was read, count the file
        counts["corrupt_files"] += 1
        counts[f"corrupt_file:{unit.path}"] += 1
