"""Synthetic long-context probes for any `tokenizers.Tokenizer`: passkey retrieval (Mohtashami &
Jaggi 2023) and needle-in-a-haystack (Kamradt; RULER-style key/number needles), built to an exact
token length with the needle at a chosen depth, seeded, returning where the needle sits; and
pre-tokenized training documents written as array_record files (`copy_documents`: repeated runs of
digit tokens; `retrieval_documents`: passkey / NIAH probes of an exact length).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from lwm_jax.errors import UserError

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n")
# The words of NIAH / RULER needle keys ("adjective-noun").
KEY_ADJECTIVES = ("ancient", "bright", "calm", "crimson", "curious", "distant", "eager", "fragile", "gentle", "golden",
               "hidden", "hollow", "icy", "lively", "lucky", "misty", "quiet", "rapid", "silver", "stormy")
KEY_NOUNS = ("anchor", "badger", "canyon", "comet", "falcon", "forest", "harbor", "lantern", "meadow", "orchard",
          "pebble", "quartz", "river", "saddle", "summit", "thistle", "tunnel", "violin", "walnut", "willow")


PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
NIAH_NEEDLE = " One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
                 "The special magic number for {key} mentioned in the provided text is")


def template_text() -> str:
    """Every fixed word of the passkey and NIAH prompts (intros, filler, needles, questions, keys)."""
    parts = [PASSKEY_INTRO, FILLER, PASSKEY_NEEDLE.format(key=0), PASSKEY_QUESTION, NIAH_INTRO,
             NIAH_NEEDLE.format(key="a-b", value=0), NIAH_QUESTION.format(key="a-b")]
    return " ".join([*parts, *KEY_ADJECTIVES, *KEY_NOUNS])


@dataclasses.dataclass(frozen=True)
class SyntheticSample:
    """A probe: `ids` (int32, exactly the requested length), the expected `answer` and its tokens as
    a continuation (`answer_ids`, encoded with a leading space), and the needle's token span."""

    task: str
    ids: np.ndarray
    answer: str
    answer_ids: list[int]
    needle_start: int
    needle_end: int
    haystack_start: int  # ids[haystack_start:question_start] = haystack with the needle inside
    question_start: int
    depth: float  # requested depth in [0, 1]
    question: str

    @property
    def actual_depth(self) -> float:
        """Where the needle sits within the haystack (0 = first token, 1 = after the last)."""
        haystack = self.question_start - self.haystack_start - (self.needle_end - self.needle_start)
        return (self.needle_start - self.haystack_start) / max(haystack, 1)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def split_sentences(text: str) -> list[str]:
    """`text` cut after each '.', '!' or '?' that precedes whitespace, stripped, empty parts dropped;
    a UserError when nothing is left."""
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    if not parts:
        raise UserError("haystack text is empty: give some text to hide the needle in")
    return parts


def _assemble(tokenizer, task: str, length: int, depth: float, intro: str, haystack: str, needle: str,
              question: str, answer: str, bos_id: int | None) -> SyntheticSample:
    if not (isinstance(length, int) and length > 0):
        raise UserError(f"length={length!r} must be a positive integer number of tokens")
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"depth={depth!r} must be in [0, 1] (0 = start of the haystack, 1 = its end)")
    head = ([bos_id] if bos_id is not None else []) + _encode(tokenizer, intro)
    needle_ids = _encode(tokenizer, needle)
    question_ids = _encode(tokenizer, question)
    budget = length - len(head) - len(needle_ids) - len(question_ids)
    if budget < 0:
        raise UserError(f"length={length} is too short for a {task} prompt (needs at least "
                        f"{length - budget} tokens with this tokenizer)")
    sentence_ids = [e.ids for e in tokenizer.encode_batch([" " + s for s in split_sentences(haystack)],
                                                          add_special_tokens=False)]
    hay: list[int] = []
    bounds = [0]
    i = 0
    while len(hay) < budget:
        hay.extend(sentence_ids[i % len(sentence_ids)])
        bounds.append(len(hay))
        i += 1
    hay = hay[:budget]
    target = depth * budget
    insert = min((b for b in bounds if b <= budget), key=lambda b: (abs(b - target), b))
    ids = np.asarray(head + hay[:insert] + needle_ids + hay[insert:] + question_ids, dtype=np.int32)
    start = len(head) + insert
    return SyntheticSample(task=task, ids=ids, answer=answer, answer_ids=_encode(tokenizer, " " + answer),
                           needle_start=start, needle_end=start + len(needle_ids), haystack_start=len(head),
                           question_start=len(ids) - len(question_ids), depth=depth, question=question.strip())


def passkey_sample(tokenizer, length: int, depth: float, seed: int, *, bos_id: int | None = None,
                   digits: int = 5) -> SyntheticSample:
    """Passkey retrieval: a random `digits`-digit key inside repeated filler, then the question."""
    rng = np.random.default_rng(seed)
    key = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
    return _assemble(tokenizer, "passkey", length, depth, PASSKEY_INTRO, FILLER, PASSKEY_NEEDLE.format(key=key),
                     PASSKEY_QUESTION, key, bos_id)


def niah_sample(tokenizer, length: int, depth: float, seed: int, *, haystack: str | None = None,
                bos_id: int | None = None) -> SyntheticSample:
    """Needle in a haystack: "One of the special magic numbers for {key} is: {7 digits}." hidden in
    `haystack` text (default: the passkey filler), cut at sentence boundaries and repeated as needed."""
    rng = np.random.default_rng(seed)
    key = f"{KEY_ADJECTIVES[rng.integers(len(KEY_ADJECTIVES))]}-{KEY_NOUNS[rng.integers(len(KEY_NOUNS))]}"
    value = str(int(rng.integers(1_000_000, 10_000_000)))
    return _assemble(tokenizer, "niah", length, depth, NIAH_INTRO, haystack or FILLER,
                     NIAH_NEEDLE.format(key=key, value=value), NIAH_QUESTION.format(key=key), value, bos_id)


# Training documents -------------------------------------------------------------------------------

RETRIEVAL_TASKS = ("passkey", "niah")  # the tasks of `retrieval_documents`, in the order that seeds them
NIAH_TRAIN_SKIP = 2000  # training haystacks start after the sentences the NIAH evaluation uses


def fit_to_length(make: Callable[[int], Any], length: int, total: Callable[[Any], int] | None = None):
    """The sample (or probe) `make(n)` whose `total(...)` length (default: prompt + answer ids) is
    `length`: built at `length`, then rebuilt once with the haystack shortened by the excess that the
    template, question and answer added."""
    total = total or (lambda x: len(x.ids) + len(x.answer_ids))
    sample = make(length)
    extra = total(sample) - length
    if extra:
        if length - extra <= 0:
            raise UserError(f"length={length} is too short for this probe (needs at least {total(sample)} tokens)")
        sample = make(length - extra)
    if abs(total(sample) - length) > max(1, 0.01 * length):
        raise UserError(f"could not build a probe of {length} tokens (got {total(sample)})")
    return sample


def retrieval_documents(tokenizer, task: str, length: int, count: int, path: str | Path, *, bos_id: int, seed: int,
                        sentences: list[str] | None = None, skip_sentences: int = NIAH_TRAIN_SKIP) -> int:
    """Writes up to `count` `task` probes ("passkey" or "niah") of exactly `length` tokens (prompt +
    answer, built with `bos_id` first) as pre-tokenized array_record documents of `length - 1` ids,
    the BOS left out (`prepare` adds it): after BOS + EOS each fills one `length + 1` sequence.

    Depths are random; NIAH haystacks are runs of `sentences` (required for "niah") starting at
    `skip_sentences` or later. Probes that cannot be built to exactly `length` are skipped. Returns
    how many were written; the file is removed when none was. Seeded by (`seed`, `length`, task)."""
    if task not in RETRIEVAL_TASKS:
        raise UserError(f"retrieval task {task!r} is not one of {', '.join(RETRIEVAL_TASKS)}")
    if task == "niah" and not sentences:
        raise UserError("niah retrieval documents need `sentences` to build haystacks from")
    path = Path(path)
    rng = np.random.default_rng([seed, length, RETRIEVAL_TASKS.index(task)])
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(path), "group_size:1")
    written = 0
    span = length // 12 + 24  # sentences (~30 tokens each) enough for one haystack
    for _ in range(count):
        depth, key_seed = float(rng.random()), int(rng.integers(2**31))
        if task == "passkey":
            make = functools.partial(passkey_sample, tokenizer, depth=depth, seed=key_seed, bos_id=bos_id)
        else:
            start = int(rng.integers(skip_sentences, len(sentences) - span))
            hay = " ".join(sentences[start:start + span])
            make = functools.partial(niah_sample, tokenizer, depth=depth, seed=key_seed, haystack=hay, bos_id=bos_id)
        try:
            sample = fit_to_length(make, length)
        except UserError:  # too short for this probe (NIAH needs 125-135 tokens with the demo tokenizer)
            continue
        if len(sample.ids) + len(sample.answer_ids) != length:
            continue
        ids = np.concatenate([sample.ids[1:], np.asarray(sample.answer_ids, np.int32)]).astype("<i4")
        writer.write(ids.tobytes())
        written += 1
    writer.close()
    if not written:
        path.unlink()
    return written


def copy_documents(tokenizer, count: int, path: str | Path, seed: int) -> int:
    """Writes `count` short documents: a run of 3-10 random digit tokens repeated 2-4 times. Only
    copying from earlier in the document predicts the repeats: the circuit (an induction head) that
    passkey and NIAH answers need. Digits because those answers are digits (the demo tokenizer has
    136 all-digit tokens); short, and packed by document, so that attention has few places to look
    while the circuit forms. Calibration: with random tokens from the whole 4,096-token vocabulary,
    in 128-token documents, or with passkey documents alone, 300-600 steps taught no copying."""
    path = Path(path)
    alphabet = np.array(sorted(i for t, i in tokenizer.get_vocab().items() if t.isascii() and t.isdigit()))
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for _ in range(count):
        run = rng.choice(alphabet, int(rng.integers(3, 11)))
        writer.write(np.tile(run, int(rng.integers(2, 5))).astype("<i4").tobytes())
    writer.close()
    return count
