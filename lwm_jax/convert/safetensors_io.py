"""Safetensors files of a Hugging Face folder: finding which file holds each tensor (single file or
an index with shards), reading tensors checked and in row blocks, and writing shards as a stream.

Conversion of a model larger than the host's memory needs both directions to hold one tensor at a
time: reads go through `safe_open` (memory-mapped, sliced), and writes lay down the header first
(every name, shape and offset is known from the config) and then each tensor's bytes in turn, which
`safetensors.numpy.save_file` (one dict of every tensor in memory) cannot do.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors

from lwm_jax.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
PICKLE_HINT = ("convert them to safetensors first, e.g. python -c \"from transformers import "
               "AutoModelForCausalLM as M; M.from_pretrained('IN').save_pretrained('OUT')\"")
DTYPE_CODES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}
BLOCK_BYTES = 64 * 2**20  # rows per read block: a large tensor is converted to float32 in pieces this big


def _open(path: Path):
    try:
        return safetensors.safe_open(path, framework="numpy")
    except safetensors.SafetensorError as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); it may be truncated or "
                        "damaged: download or copy it again") from None


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: hf_dir / fname for name, fname in weight_map.items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{index} is not a safetensors index (expected JSON with a weight_map of "
                            f"tensor name -> file): {err!r}") from None
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise UserError(f"{index} names missing shard file(s): {', '.join(missing)}")
        return files
    single = sorted(hf_dir.glob("*.safetensors"))
    if not single:
        pickles = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt*"))
        if pickles:
            raise UserError(f"{hf_dir} holds only pickle weights ({', '.join(pickles)}); lwm-jax never "
                            f"unpickles files: {PICKLE_HINT}")
        raise UserError(f"{hf_dir} has no *.safetensors weights")
    files = {}
    for path in single:
        with _open(path) as f:
            files.update(dict.fromkeys(f.keys(), path))  # a safe_open handle has keys() but is not iterable
    return files


class TensorReader:
    """Reads HF tensors as float32 numpy, checking each shape. Each read opens its file afresh, so
    the memory map (resident pages count as the process's memory) lasts one read only."""

    def __init__(self, files: dict[str, Path], shapes: dict[str, tuple[int, ...]]):
        self.files, self.shapes = files, shapes

    def _rows(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        path = self.files[name]
        with _open(path) as f:
            return np.asarray(self._check(path, f, name)[start:stop], dtype=np.float32)

    def check_all(self) -> None:
        """Opens every file once and checks every tensor's shape against the config."""
        by_file: dict[Path, list[str]] = {}
        for name in self.shapes:
            by_file.setdefault(self.files[name], []).append(name)
        for path, names in by_file.items():
            with _open(path) as f:
                for name in names:
                    self._check(path, f, name)

    def _check(self, path: Path, handle, name: str):
        try:
            tensor = handle.get_slice(name)
        except safetensors.SafetensorError as err:
            raise UserError(f"{path} does not hold tensor {name} that the index names ({err})") from None
        shape = tuple(tensor.get_shape())
        if shape != self.shapes[name]:
            raise UserError(f"tensor {name} has shape {shape} but the config expects {self.shapes[name]}")
        return tensor

    def __call__(self, name: str) -> np.ndarray:
        return self._rows(name)

    def blocks(self, name: str) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yields `(start, stop, rows start:stop as float32)` covering the tensor's first axis."""
        shape = self.shapes[name]
        step = max(1, BLOCK_BYTES // (4 * math.prod(shape[1:])))
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            yield start, stop, self._rows(name, start, stop)


def plan_shards(entries: list[tuple[str, tuple[int, ...]]], dtype, max_shard_bytes: int
                ) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Splits `(name, shape)` entries, in order, into shards of at most `max_shard_bytes` (a tensor
    larger than that gets a shard of its own)."""
    itemsize = np.dtype(dtype).itemsize
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype,
                      tensors: Iterator[tuple[str, np.ndarray]], metadata: dict[str, str]) -> None:
    """Writes one safetensors file holding `entries` in order, taking each tensor from `tensors`
    (which must yield them in that order) and writing it before the next is taken. The file is
    written under a temporary name and renamed when complete (removed on failure; an OSError names
    `path`); its mode follows the umask."""
    dtype = np.dtype(dtype)
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name, shape in entries:
                got, value = next(tensors)
                if got != name or tuple(value.shape) != tuple(shape):
                    raise AssertionError(f"tensor stream gave {got} {value.shape}, expected {name} {shape}")
                f.write(np.ascontiguousarray(value.astype(dtype, copy=False)).view(np.uint8))
                del value
        os.replace(partial, path)
    except BaseException as err:
        partial.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:  # a failed write names no file: name it
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
