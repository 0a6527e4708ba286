"""Mean next-token negative log-likelihood of a checkpoint on given token sequences of any length.

Runs the model over the whole batch at once (sharded over the mesh when one is given, in the
layout of its attention) and reduces with the chunked loss, so the logits of a long sequence are
never materialised. Rows are padded at their end to the length the layout accepts (and the batch
to the mesh's data axes); padding has segment id 0, which no real token has, and loss weight 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lwm_jax.attention.layout import layout_length, place
from lwm_jax.data.manifest import load_manifest
from lwm_jax.data.packing import decode_record
from lwm_jax.data.pipeline import ShardSource
from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info
from lwm_jax.errors import UserError
from lwm_jax.eval.niah import read_documents
from lwm_jax.model.llama import Llama
from lwm_jax.parallel.mesh import batch_shards
from lwm_jax.train.loss import chunked_cross_entropy


def load_tokens(path: str | Path, vocab_size: int) -> np.ndarray:
    """Reads int token ids `[batch, seq]` from a `.npy` file, checking them against the vocab."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"token file {path} does not exist")
    try:
        tokens = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise UserError(f"{path} is not a plain .npy array: {err}") from None
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise UserError(f"{path} must hold integer token ids [batch, seq], got {tokens.dtype} {tokens.shape}")
    if tokens.shape[1] < 2:
        raise UserError(f"{path} holds sequences of length {tokens.shape[1]}; need at least 2 tokens")
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        b, s = np.argwhere(bad)[0]
        raise UserError(f"token id {tokens[b, s]} at [{b}, {s}] of {path} is outside the model's vocab "
                        f"[0, {vocab_size})")
    return tokens.astype(np.int32)


PAD_SEGMENT = 0  # the segment id of padding (as in packed training data); real tokens have REAL_SEGMENT
REAL_SEGMENT = 1


def _rows(tokens) -> list[np.ndarray]:
    """The token rows of `[batch, seq]` ids or of a sequence of 1-D rows of any lengths."""
    rows = [np.asarray(r, np.int32).reshape(-1) for r in tokens]
    if not rows or min(len(r) for r in rows) < 2:
        raise UserError("every sequence needs at least 2 tokens (one next-token prediction)")
    return rows


def padded_batch(tokens, impl: str, mesh=None, block_size: int = 512) -> dict[str, np.ndarray]:
    """The arrays that score `tokens` (`[batch, seq]`, or 1-D rows of different lengths) by next-token
    prediction, in natural order: `tokens, positions, segment_ids, targets: [rows, padded]` int32,
    `weights: [rows, padded]` float32 and `lengths: [batch]` (the given rows' real lengths).

    `padded` is `layout_length` of the longest row; `rows` rounds the batch up to the mesh's data
    axes with empty rows. Each row's padding has segment id PAD_SEGMENT (its tokens attend only to one
    another, never to real ones) and weight 0, as has each row's last token (nothing to predict).
    """
    rows = _rows(tokens)
    lengths = np.asarray([len(r) for r in rows], np.int32)
    ways = batch_shards(mesh)
    batch = -(-len(rows) // ways) * ways
    seq = layout_length(int(lengths.max()), impl, mesh, block_size)
    out = np.zeros((batch, seq), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
    real = positions < np.pad(lengths, (0, batch - len(rows)))[:, None]
    targets = np.concatenate([out[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    weights = (real & np.roll(real, -1, axis=1) & (positions < seq - 1)).astype(np.float32)
    segment_ids = np.where(real, REAL_SEGMENT, PAD_SEGMENT).astype(np.int32)
    return {"tokens": out, "positions": np.ascontiguousarray(positions), "segment_ids": segment_ids,
            "targets": targets, "weights": weights, "lengths": lengths}


def _batch_on_mesh(model: Llama, tokens, mesh) -> tuple[dict[str, np.ndarray], tuple]:
    """(`padded_batch` of `tokens`, its tokens, positions, segment ids and targets placed on `mesh`)."""
    cfg = model.config
    batch = padded_batch(tokens, cfg.attention, mesh, cfg.attention_block_size)
    keys = ("tokens", "positions", "segment_ids", "targets")
    return batch, place(tuple(batch[k] for k in keys), cfg.attention, mesh)


def mean_nll(model: Llama, tokens, mesh=None) -> tuple[float, int]:
    """Returns (mean NLL over all next-token predictions, number of predicted tokens) of `tokens`:
    `[batch, seq]` ids of any `seq`, or 1-D rows of different lengths (see `padded_batch`)."""
    batch, arrays = _batch_on_mesh(model, tokens, mesh)
    weights = place([batch["weights"]], model.config.attention, mesh)[0]

    @nnx.jit
    def run(model, tokens, positions, segment_ids, targets, weights):
        hidden = model.hidden(tokens, positions, segment_ids)
        nll, count = chunked_cross_entropy(hidden, model.output_weights(), targets, weights)
        return nll / count

    value = run(model, *arrays, weights)
    return float(value), int(batch["weights"].sum())


# Loss by position and the --data sources ------------------------------------------------------


def default_buckets(seq: int) -> list[int]:
    """Bucket edges 0, 1K, 4K, 16K, ... (x4) below `seq`, then `seq`: buckets 0-1K, 1K-4K, ..., the
    last one ending at `seq` (one bucket 0-seq for sequences of at most 1K tokens)."""
    edges = [0]
    edge = 1024
    while edge < seq:
        edges.append(edge)
        edge *= 4
    return edges + [seq]


def parse_buckets(text: str | None, seq: int) -> list[int]:
    """Edges from '1024,4096' (0 and `seq` added); the default when `text` is None."""
    if not text:
        return default_buckets(seq)
    try:
        inner = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise UserError(f"--buckets {text!r} must be comma-separated token positions, e.g. 1024,4096,16384") from None
    if any(not 0 < x < seq for x in inner):
        raise UserError(f"--buckets {text!r}: every edge must lie strictly between 0 and seq_len={seq}")
    return [0, *inner, seq]


def nll_by_position(model: Llama, tokens, edges: list[int], mesh=None) -> dict:
    """Mean NLL overall and per position bucket [edges[i], edges[i+1]) of `tokens` (as `mean_nll`).

    The prediction made at position t (of token t+1, with t+1 tokens of context) falls in the
    bucket holding t. One forward pass; each bucket is a masked chunked loss over the same hidden.
    """
    batch, arrays = _batch_on_mesh(model, tokens, mesh)
    positions, valid = batch["positions"], batch["weights"] > 0
    weights = np.stack([(valid & (positions >= a) & (positions < b)).astype(np.float32)
                        for a, b in zip(edges[:-1], edges[1:])])  # [buckets, rows, padded]
    weights = place([weights], model.config.attention, mesh, axis=2)[0]

    @nnx.jit
    def run(model, tokens, positions, segment_ids, targets, weights):
        hidden = model.hidden(tokens, positions, segment_ids)
        sums = [chunked_cross_entropy(hidden, model.output_weights(), targets, weights[i])
                for i in range(weights.shape[0])]
        return jnp.stack([s[0] for s in sums]), jnp.stack([s[1] for s in sums])

    nll, count = (np.asarray(x, np.float64) for x in run(model, *arrays, weights))
    buckets = [{"start": a, "end": b, "mean_nll": float(n / c) if c else None, "tokens": int(c)}
               for a, b, n, c in zip(edges[:-1], edges[1:], nll, count)]
    return {"mean_nll": float(nll.sum() / count.sum()), "tokens": int(count.sum()), "buckets": buckets}


def _prepared_chunks(path: Path) -> Iterator[np.ndarray]:
    """The real tokens of each sequence of a prepared dataset folder, source by source."""
    for source in load_manifest(path)["sources"].values():
        records = ShardSource(source["shard_paths"], source["shard_records"])
        for i in range(len(records)):
            record = decode_record(records[i])
            yield np.asarray(record.tokens[:record.n_real], np.int32)


def _token_chunks(paths: list[str], vocab_size: int, tokenizer_dir: str | None) -> Iterator[np.ndarray]:
    """Token chunks of each path in order: prepared folders, .npy token files, text documents (BOS +
    document + EOS, tokenized with `tokenizer_dir`)."""
    tokenizer = info = None
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from _prepared_chunks(path)
        elif path.suffix == ".npy":
            yield load_tokens(path, vocab_size).reshape(-1)
        else:
            if tokenizer_dir is None:
                raise UserError(f"--data {path} is text: give --tokenizer DIR to tokenize it")
            if tokenizer is None:
                info = load_tokenizer_info(tokenizer_dir)
                tokenizer = get_tokenizer(info.tokenizer_file)
            for text in _documents(path):
                ids = tokenizer.encode(text, add_special_tokens=False).ids
                yield np.asarray([info.bos_id, *ids, info.eos_id], np.int32)


def load_eval_data(paths: list[str], seq_len: int, num_sequences: int, vocab_size: int,
                   tokenizer_dir: str | None = None) -> np.ndarray:
    """`[num_sequences, seq_len]` int32 tokens from .npy files, text / .jsonl[.zst|.gz] files
    (BOS + document + EOS, needs a tokenizer) or prepared dataset folders, concatenated in order."""
    if num_sequences < 1:
        raise UserError(f"--num-sequences={num_sequences} must be >= 1")
    if seq_len < 2:
        raise UserError(f"the sequence length {seq_len} must be >= 2 (one next-token prediction)")
    need = seq_len * num_sequences
    chunks: list[np.ndarray] = []
    have = 0
    for chunk in _token_chunks(paths, vocab_size, tokenizer_dir):
        chunks.append(chunk)
        have += chunk.size
        if have >= need:
            break
    if have < need:
        raise UserError(f"--data holds {have:,} tokens, fewer than {num_sequences} sequences x seq_len {seq_len:,} "
                        f"= {need:,}; give more data, fewer --num-sequences or a shorter --seq-len")
    tokens = np.concatenate(chunks)[:need].reshape(num_sequences, seq_len)
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise UserError(f"--data holds token ids outside the model's vocab [0, {vocab_size})")
    return tokens


def _documents(path: Path) -> list[str]:
    """The documents of a text file (the whole file) or of a .jsonl[.zst|.gz] file (its text fields)."""
    return read_documents(path, what="--data file")
