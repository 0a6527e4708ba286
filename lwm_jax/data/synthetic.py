"""Synthetic long-context probes for any `tokenizers.Tokenizer`: passkey retrieval (Mohtashami &
Jaggi 2023) and needle-in-a-haystack (Kamradt; RULER-style key/number needles), built to an exact
token length with the needle at a chosen depth, seeded, returning where the needle sits.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from lwm_jax.errors import UserError

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n")
_ADJECTIVES = ("ancient", "bright", "calm", "crimson", "curious", "distant", "eager", "fragile", "gentle", "golden",
               "hidden", "hollow", "icy", "lively", "lucky", "misty", "quiet", "rapid", "silver", "stormy")
_NOUNS = ("anchor", "badger", "canyon", "comet", "falcon", "forest", "harbor", "lantern", "meadow", "orchard",
          "pebble", "quartz", "river", "saddle", "summit", "thistle", "tunnel", "violin", "walnut", "willow")


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


def _sentences(text: str) -> list[str]:
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
    sentence_ids = [e.ids for e in tokenizer.encode_batch([" " + s for s in _sentences(haystack)],
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
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    question = "\nWhat is the pass key? The pass key is"
    return _assemble(tokenizer, "passkey", length, depth, PASSKEY_INTRO, FILLER, needle, question, key, bos_id)


def niah_sample(tokenizer, length: int, depth: float, seed: int, *, haystack: str | None = None,
                bos_id: int | None = None) -> SyntheticSample:
    """Needle in a haystack: "One of the special magic numbers for {key} is: {7 digits}." hidden in
    `haystack` text (default: the passkey filler), cut at sentence boundaries and repeated as needed."""
    rng = np.random.default_rng(seed)
    key = f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]}-{_NOUNS[rng.integers(len(_NOUNS))]}"
    value = str(int(rng.integers(1_000_000, 10_000_000)))
    needle = f" One of the special magic numbers for {key} is: {value}."
    question = (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
                f"The special magic number for {key} mentioned in the provided text is")
    return _assemble(tokenizer, "niah", length, depth, NIAH_INTRO, haystack or FILLER, needle, question, value,
                     bos_id)
