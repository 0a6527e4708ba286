"""Scoring of the retrieval probes (NIAH, passkey, RULER): a Llama wrapped as a `logits_fn`,
teacher-forced and generated-answer scoring against any `logits_fn(ids) -> logits`, the grid of
(length, depth) cells, and the setup every probe command shares.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from lwm_jax.attention.layout import check_mesh, from_layout, layout_length, place, sp_size
from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info
from lwm_jax.errors import UserError
from lwm_jax.eval.probes import ChatWrap, Probe, chat_wrap_for
from lwm_jax.generate import generate
from lwm_jax.model.context import check_context
from lwm_jax.model.opened import open_checkpoint
from lwm_jax.model.rope import length_temperature, with_attention_temperature
from lwm_jax.model.store import merge_params
from lwm_jax.parallel.mesh import batch_shards
from lwm_jax.progress import Counter

# `logits_fn(ids: int32 [seq]) -> float [k, vocab]`: logits of the last k positions (any k >= 1;
# the scorer needs k >= len(answer) + 1). A Llama (`ModelLogits`) or a test oracle.
LogitsFn = Callable[[np.ndarray], np.ndarray]


def score_teacher_forced(logits_fn: LogitsFn, probe: Probe) -> tuple[float, float]:
    """(exact 1.0/0.0: every answer token is the argmax, fraction of answer tokens that are)."""
    n = len(probe.answer_ids)
    ids = np.concatenate([probe.prompt, np.asarray(probe.answer_ids, np.int32)])
    if hasattr(logits_fn, "ensure_tail"):  # a `ModelLogits`: make it return enough rows
        logits_fn.ensure_tail(n + 1)
    logits = np.asarray(logits_fn(ids))
    if logits.ndim != 2 or logits.shape[0] < n + 1:
        raise ValueError(f"logits_fn returned shape {logits.shape}; need [>= {n + 1}, vocab]")
    predicted = logits[-(n + 1):-1].argmax(axis=-1)
    hits = predicted == np.asarray(probe.answer_ids)
    return float(hits.all()), float(hits.mean())


TEMPERATURES = ("none", "log-n")


class LengthTempered:
    """A `logits_fn` that scores each sequence with `model`'s weights at the log-n attention
    temperature of the nearest of `lengths` (`lwm_jax.model.rope.length_temperature` over the
    model's trained length): the same weights, only cos/sin scaled, 1 within the trained length."""

    def __init__(self, model, lengths, mesh=None, tail: int = 32, max_length: int | None = None):
        cfg = model.config
        params = nnx.to_pure_dict(nnx.state(model))
        self.scales = {n: length_temperature(n, cfg.max_position_embeddings) for n in lengths}
        self.fns = {n: ModelLogits(merge_params(with_attention_temperature(cfg, s), params) if s != 1.0 else model,
                                   mesh, tail, max_length) for n, s in self.scales.items()}

    def ensure_tail(self, rows: int) -> None:
        for fn in self.fns.values():
            fn.ensure_tail(rows)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.fns[min(self.fns, key=lambda n: abs(n - len(ids)))](ids)


def generate_fn_for(model, mesh, stop_ids) -> Callable[[np.ndarray, int], list[int]]:
    """Greedy `(prompt, max_new_tokens) -> new tokens` through `lwm_jax.generate.generate`."""
    def run(prompt: np.ndarray, max_new_tokens: int) -> list[int]:
        return list(generate(model, np.asarray(prompt).tolist(), max_new_tokens=max_new_tokens, greedy=True,
                             stop_ids=tuple(stop_ids), mesh=mesh))

    return run


def score_generated(generate_fn, tokenizer, probe: Probe, slack: int = 8) -> float:
    """1.0 when the greedy continuation's first word (or words, for a list answer) is the answer."""
    new = generate_fn(probe.prompt, len(probe.answer_ids) + slack)
    text = tokenizer.decode(list(new), skip_special_tokens=True).strip()
    return float(text.startswith(probe.answer.strip()))


@functools.partial(nnx.jit, static_argnames=("start", "tail", "sp"))
def _tail_logits(model, tokens, positions, segment_ids, *, start: int, tail: int, sp: int):
    """Float32 logits `[batch, tail, vocab]` of natural positions [start, start+tail)."""
    hidden = from_layout(model.hidden(tokens, positions, segment_ids), model.config.attention, sp)  # natural
    return model.logits(jax.lax.slice_in_dim(hidden, start, start + tail, axis=1))


class ModelLogits:
    """A Llama as a `logits_fn`: the logits of the last `tail` positions of one sequence.

    The sequence is padded at its end to the length the attention's layout accepts, the padding in
    a segment of its own (id 0; the real tokens' is 1) so no real token attends to it, tiled over the
    mesh's data axes, in the layout's token order.
    `max_length` (default: the model's max_position_embeddings) bounds what is accepted
    (`lwm_jax.model.context.check_context`).
    """

    def __init__(self, model, mesh=None, tail: int = 32, max_length: int | None = None):
        self.model, self.mesh, self.tail = model, mesh, tail
        cfg = model.config
        self.max_length = max_length or cfg.max_position_embeddings
        check_mesh(cfg.attention, mesh)
        self.sp = sp_size(mesh)
        self.batch = batch_shards(mesh)

    def ensure_tail(self, rows: int) -> None:
        """Return at least `rows` logits rows from now on (a long answer)."""
        self.tail = max(self.tail, rows)

    def check_length(self, length: int, what: str = "length") -> None:
        """A UserError past `max_length` (the caller warned about the trained length once)."""
        check_context(length, self.model.config.max_position_embeddings, what=what, limit=self.max_length,
                      warn=False)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        cfg = self.model.config
        seq = len(ids)
        self.check_length(seq)
        padded = layout_length(seq, cfg.attention, self.mesh, cfg.attention_block_size)
        tokens = np.zeros((self.batch, padded), np.int32)
        tokens[:, :seq] = ids
        positions = np.broadcast_to(np.arange(padded, dtype=np.int32), tokens.shape)
        segment_ids = (positions < seq).astype(np.int32)  # 1: the sequence, 0: its padding
        arrays = place((tokens, positions, segment_ids), cfg.attention, self.mesh)
        tail = min(self.tail, seq)
        out = _tail_logits(self.model, *arrays, start=seq - tail, tail=tail, sp=self.sp)
        return np.asarray(jax.device_get(out[0]))


def run_grid(make_probe: Callable[[int, float, int], Probe], logits_fn: LogitsFn, *, lengths, depths, samples: int,
             desc: str, generate_fn=None, tokenizer=None) -> list[dict]:
    """Scores `samples` probes per (length, depth) cell; `make_probe(length, depth, k)`.

    Returns one dict per cell: length, depth, score (mean exact match, teacher-forced),
    token_accuracy, generated_score (with `generate_fn`) and the per-sample records.
    """
    if samples < 1:
        raise UserError(f"samples={samples} must be >= 1")
    cells = [(length, depth) for length in lengths for depth in depths]
    out = []
    counter = Counter(f"{desc} probes", total=len(cells) * samples)  # by probe: a cell of many samples is long
    for length, depth in cells:
        records = []
        for k in range(samples):
            counter.update(0, note=f"length {length:,}, depth {depth:.0%}")
            probe = make_probe(length, depth, k)
            exact, token_acc = score_teacher_forced(logits_fn, probe)
            record = {"answer": probe.answer, "exact": exact, "token_accuracy": token_acc, "tokens": probe.length,
                      "actual_depth": probe.actual_depth}
            if generate_fn is not None:
                record["generated"] = score_generated(generate_fn, tokenizer, probe)
            records.append(record)
            counter.update(1)
        cell = {"length": length, "depth": depth, "score": float(np.mean([r["exact"] for r in records])),
                "token_accuracy": float(np.mean([r["token_accuracy"] for r in records])), "samples": records}
        if generate_fn is not None:
            cell["generated_score"] = float(np.mean([r["generated"] for r in records]))
        out.append(cell)
    counter.close()
    return out


def by_length(cells: list[dict], key: str = "score") -> dict[int, float]:
    """Mean `key` per length over the cells of that length."""
    lengths = sorted({c["length"] for c in cells})
    return {n: float(np.mean([c[key] for c in cells if c["length"] == n])) for n in lengths}


def wilson_interval(hits: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion `hits / n` (95% by default): unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0 or n hits (Wilson 1927)."""
    if n <= 0:
        raise ValueError(f"n={n} must be positive")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def intervals_by_length(cells: list[dict], key: str = "exact") -> dict[int, dict]:
    """Per length: probes scored, exact-match hits and the Wilson 95% interval of their share."""
    out = {}
    for n in sorted({c["length"] for c in cells}):
        records = [r for c in cells if c["length"] == n for r in c["samples"]]
        hits = sum(r[key] for r in records)
        out[n] = {"probes": len(records), "hits": hits, "interval": wilson_interval(hits, len(records))}
    return out


@dataclasses.dataclass
class ProbeSetup:
    """What a probe command needs: tokenizer, its info, the model as a `logits_fn`, the chat
    wrapper (None without --chat), the greedy generator (None without --generate) and the
    checkpoint's metadata (recipe, stage, theta, trained length: what plots are titled with)."""

    tokenizer: object
    info: object
    logits_fn: ModelLogits | LengthTempered
    chat: ChatWrap | None
    generate_fn: Callable | None
    meta: dict = dataclasses.field(default_factory=dict)


def setup_probes(ckpt: str, tokenizer_dir: str, *, mesh=None, chat: bool = False, generate: bool = False,
                 max_length: int | None = None, lengths=(), tail: int = 32, temperature: str = "none",
                 **runtime) -> ProbeSetup:
    """Loads tokenizer and checkpoint (onto `mesh`, inside its `jax.set_mesh`) and checks `lengths`.

    Lengths past `max_length` (default: the checkpoint's max_position_embeddings) are refused, past
    the trained length warned about (`check_context`). Tokenizer and bad lengths are checked before
    the checkpoint is restored, so bad input fails fast. `temperature="log-n"` scores each of
    `lengths` with the log-n attention temperature (`LengthTempered`).
    """
    if temperature not in TEMPERATURES:
        raise UserError(f"temperature={temperature!r} is not one of {', '.join(TEMPERATURES)}")
    if temperature == "log-n" and (generate or not lengths):
        raise UserError("the log-n temperature applies to teacher-forced scores at given lengths: "
                        "leave out --generate")
    info = load_tokenizer_info(tokenizer_dir)
    tokenizer = get_tokenizer(info.tokenizer_file)
    wrap = chat_wrap_for(tokenizer, info, chat)
    if max_length is not None and max_length < 1:
        raise UserError(f"--max-length={max_length} must be >= 1")
    opened = open_checkpoint(ckpt, mesh, **runtime)
    limit = max_length or opened.trained_length
    if lengths:
        opened.check_context(max(lengths), what="length", limit=limit)
    if opened.config.vocab_size < info.vocab_size:
        raise UserError(f"tokenizer {info.directory} has {info.vocab_size} tokens but the model's vocab_size is "
                        f"{opened.config.vocab_size}")
    model = opened.model()
    stop = opened.stop_ids(tokenizer, info.eos_id)
    logits_fn = (LengthTempered(model, lengths, mesh, tail=tail, max_length=limit) if temperature == "log-n"
                 else ModelLogits(model, mesh, tail=tail, max_length=limit))
    return ProbeSetup(tokenizer, info, logits_fn, wrap, generate_fn_for(model, mesh, stop) if generate else None,
                      opened.metadata)


def parse_lengths(text: str) -> list[int]:
    """'1K,4096,1M' -> [1024, 4096, 1048576], each length once (a repeat, '1K,1024', would only run
    the same cell again); a UserError for anything else."""
    out = []
    for part in text.split(","):
        part = part.strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(part[-1:].upper(), 1)
        digits = part[:-1] if scale > 1 else part
        if not digits.isdigit() or int(digits) <= 0:
            raise UserError(f"length {part!r} in {text!r} must be a positive integer, optionally with K or M")
        out.append(int(digits) * scale)
    return list(dict.fromkeys(out))


def parse_depths(text: str) -> list[float]:
    """Depth percentages '0,50,100' -> fractions [0.0, 0.5, 1.0], each depth once."""
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        raise UserError(f"--depths {text!r} must be comma-separated percentages, e.g. 0,25,50,75,100") from None
    if any(not 0 <= v <= 100 for v in values):
        raise UserError(f"--depths {text!r}: every depth must be a percentage in [0, 100]")
    return list(dict.fromkeys(v / 100 for v in values))
