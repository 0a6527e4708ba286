"""Packing: documents (BOS + tokens + EOS) concatenated and cut into sequences of seq_len+1 tokens,
stored as compact records (tokens, document starts, optional loss mask), and expanded at read time
into the training example (tokens, segment_ids, positions, loss_weights) of either packing mode.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lwm_jax.errors import UserError

_MAGIC = 0x314D574C  # b"LWM1" little-endian
_VERSION = 1
_HEADER = 6  # int32 words: magic, version, n_total, n_real, n_segments, flags
_HAS_MASK = 1


@dataclasses.dataclass(frozen=True)
class PackedRecord:
    """One packed sequence: `tokens: [n]`, `starts: [segments]` (document starts, first is 0),
    `n_real` real tokens followed by padding, and `mask: [n]` uint8 loss mask (chat) or None."""

    tokens: np.ndarray
    starts: np.ndarray
    n_real: int
    mask: np.ndarray | None = None


def encode_record(tokens: np.ndarray, starts: np.ndarray, n_real: int, mask: np.ndarray | None = None) -> bytes:
    """Serialises a packed sequence (little-endian int32 words, then the uint8 mask if any)."""
    flags = _HAS_MASK if mask is not None else 0
    header = np.array([_MAGIC, _VERSION, len(tokens), n_real, len(starts), flags], dtype="<i4")
    parts = [header.tobytes(), np.asarray(tokens, dtype="<i4").tobytes(), np.asarray(starts, dtype="<i4").tobytes()]
    if mask is not None:
        parts.append(np.asarray(mask, dtype=np.uint8).tobytes())
    return b"".join(parts)


def decode_record(data: bytes) -> PackedRecord:
    """Inverse of `encode_record`; arrays are zero-copy views of `data`."""
    header = np.frombuffer(data, dtype="<i4", count=_HEADER)
    magic, version, n, n_real, n_seg, flags = (int(x) for x in header)
    if magic != _MAGIC or version != _VERSION:
        raise UserError(f"not an lwm-jax packed record (magic={magic:#x}, version={version}); "
                        "re-run `lwm-jax data prepare` with this version")
    off = _HEADER * 4
    tokens = np.frombuffer(data, dtype="<i4", count=n, offset=off)
    off += 4 * n
    starts = np.frombuffer(data, dtype="<i4", count=n_seg, offset=off)
    off += 4 * n_seg
    mask = np.frombuffer(data, dtype=np.uint8, count=n, offset=off) if flags & _HAS_MASK else None
    return PackedRecord(tokens, starts, n_real, mask)


EXAMPLE_KEYS = ("tokens", "segment_ids", "positions", "loss_weights")


def fill_example(record: PackedRecord, packing: str, tokens: np.ndarray, segment_ids: np.ndarray,
                 positions: np.ndarray, loss_weights: np.ndarray) -> None:
    """Writes the training example of `record` into the given rows (see `to_example`)."""
    if packing not in ("continuous", "document"):
        raise UserError(f"packing={packing!r} is not one of ('continuous', 'document')")
    n, n_real, starts = len(record.tokens), record.n_real, record.starts
    seg_lens = np.diff(np.append(starts, n_real))
    tokens[:] = record.tokens
    segment_ids[:n_real] = np.repeat(np.arange(1, len(starts) + 1, dtype=np.int32), seg_lens)
    segment_ids[n_real:] = 0
    positions[:] = _arange(n)
    if record.mask is None:
        loss_weights[:] = 1.0
    else:
        loss_weights[:] = record.mask
    loss_weights[n_real:] = 0.0
    if packing == "document":
        positions[:n_real] -= np.repeat(starts, seg_lens)
        positions[n_real:] -= n_real
        loss_weights[starts] = 0.0


_ARANGE = np.arange(0, dtype=np.int32)


def _arange(n: int) -> np.ndarray:
    global _ARANGE
    if len(_ARANGE) < n:
        _ARANGE = np.arange(n, dtype=np.int32)
    return _ARANGE[:n]


def to_example(record: PackedRecord, packing: str) -> dict[str, np.ndarray]:
    """The training example of a packed record, every array of length seq_len+1.

    `segment_ids` number the documents of the sequence from 1 (0 = padding). `positions` run
    0..seq_len ("continuous") or restart at 0 with every document ("document"). `loss_weights`
    are the record's mask (chat) or 1, 0 on padding, and 0 on each document's first token in
    "document" mode (it cannot be predicted across the document mask).
    """
    return examples_batch([record], packing, squeeze=True)


def examples_batch(records: list[PackedRecord], packing: str, squeeze: bool = False) -> dict[str, np.ndarray]:
    """Examples of equally long records stacked along a new leading axis, written in place."""
    n = len(records[0].tokens)
    b = len(records)
    out = {"tokens": np.empty((b, n), np.int32), "segment_ids": np.empty((b, n), np.int32),
           "positions": np.empty((b, n), np.int32), "loss_weights": np.empty((b, n), np.float32)}
    for i, record in enumerate(records):
        if len(record.tokens) != n:
            raise UserError(f"packed records of one batch differ in length ({len(record.tokens)} != {n})")
        fill_example(record, packing, *(out[k][i] for k in EXAMPLE_KEYS))
    return {k: v[0] for k, v in out.items()} if squeeze else out


def split_inputs_targets(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Shifts a batch `[batch, seq_len+1]` into model inputs and targets, each `[batch, seq_len]`.

    Returns `inputs`, `positions`, `segment_ids` (all `[:, :-1]`) and `targets`, `loss_weights`
    (`[:, 1:]`). Use it before sharding the sequence axis: seq_len divides evenly, seq_len+1 not.
    """
    return {"inputs": batch["tokens"][:, :-1], "positions": batch["positions"][:, :-1],
            "segment_ids": batch["segment_ids"][:, :-1], "targets": batch["tokens"][:, 1:],
            "loss_weights": batch["loss_weights"][:, 1:]}


class SequencePacker:
    """Concatenates documents of one source in arrival order and cuts fixed-length sequences.

    `add` takes documents as one flat token array plus their lengths (BOS/EOS already in place)
    and returns the records completed so far; `finish` pads and returns the last partial one.
    Every token added comes out exactly once: `tokens_out == tokens_in`, counted in `stats`.
    """

    def __init__(self, seq_len: int, pad_id: int, with_mask: bool):
        self.n = seq_len + 1
        self.pad_id = pad_id
        self.with_mask = with_mask
        self._tokens = np.zeros(0, np.int32)
        self._mask = np.zeros(0, np.uint8) if with_mask else None
        self._starts = np.zeros(0, np.int64)  # document starts relative to the buffer
        self.tokens_in = 0
        self.tokens_out = 0  # real tokens written
        self.documents = 0
        self.sequences = 0
        self.padding = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> list[bytes]:
        if self.with_mask != (mask is not None):
            raise ValueError("mask must be given exactly when the packer was made with_mask")
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"document lengths sum to {int(lengths.sum())} but {len(tokens)} tokens were given")
        doc_starts = len(self._tokens) + np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        self._tokens = np.concatenate([self._tokens, np.asarray(tokens, np.int32)])
        self._starts = np.concatenate([self._starts, doc_starts[lengths > 0]])
        if mask is not None:
            self._mask = np.concatenate([self._mask, np.asarray(mask, np.uint8)])
        self.tokens_in += len(tokens)
        self.documents += int((lengths > 0).sum())
        return self._emit_full()

    def _emit_full(self) -> list[bytes]:
        count = len(self._tokens) // self.n
        if count == 0:
            return []
        bounds = np.searchsorted(self._starts, np.arange(count + 1) * self.n)
        records = []
        for i in range(count):
            a = i * self.n
            records.append(self._record(a, a + self.n, self._starts[bounds[i]:bounds[i + 1]] - a))
        cut = count * self.n
        self._tokens = self._tokens[cut:]
        self._starts = self._starts[bounds[count]:] - cut
        if self._mask is not None:
            self._mask = self._mask[cut:]
        return records

    def _record(self, a: int, b: int, starts: np.ndarray, n_real: int | None = None) -> bytes:
        if not len(starts) or starts[0] != 0:  # the sequence opens inside a document
            starts = np.concatenate([[0], starts])
        tokens = self._tokens[a:b]
        mask = None if self._mask is None else self._mask[a:b]
        n_real = len(tokens) if n_real is None else n_real
        self.sequences += 1
        self.tokens_out += n_real
        return encode_record(tokens, starts, n_real, mask)

    def finish(self) -> list[bytes]:
        """Pads the remaining tokens (segment 0, loss weight 0) into one last record, if any."""
        rest = len(self._tokens)
        if rest == 0:
            return []
        pad = self.n - rest
        self._tokens = np.concatenate([self._tokens, np.full(pad, self.pad_id, np.int32)])
        if self._mask is not None:
            self._mask = np.concatenate([self._mask, np.zeros(pad, np.uint8)])
        self.padding += pad
        record = self._record(0, self.n, self._starts, n_real=rest)
        self._tokens = self._tokens[:0]
        self._starts = self._starts[:0]
        if self._mask is not None:
            self._mask = self._mask[:0]
        return [record]


def with_bos_eos(tokens: np.ndarray, lengths: np.ndarray, bos_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Wraps every document of a flat token array in BOS ... EOS; returns (tokens, new lengths)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    new_lengths = lengths + 2
    out = np.empty(int(new_lengths.sum()), dtype=np.int32)
    starts = np.cumsum(new_lengths) - new_lengths
    body = np.ones(len(out), dtype=bool)
    body[starts] = False
    body[starts + lengths + 1] = False
    out[starts] = bos_id
    out[starts + lengths + 1] = eos_id
    out[body] = tokens
    return out, new_lengths
