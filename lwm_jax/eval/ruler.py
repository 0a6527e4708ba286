"""A RULER subset (Hsieh et al. 2024) built to an exact length for any tokenizer: single, multi-key,
multi-value and multi-query needles, variable tracking and common-word extraction, scored by exact
match of the whole answer (teacher-forced: every answer token the argmax), by task and length.

Answers with several items are asked for in a stated order (order of appearance, or of the query),
so the teacher-forced answer is well defined; RULER itself scores these by recall.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lwm_jax.data.synthetic import FILLER, KEY_ADJECTIVES, KEY_NOUNS, NIAH_INTRO, SyntheticSample, split_sentences
from lwm_jax.errors import UserError
from lwm_jax.eval.niah import check_grid, summarize
from lwm_jax.eval.probes import ChatWrap, build_to_length, cell_seed, probe_from_sample
from lwm_jax.eval.scoring import LogitsFn, by_length, run_grid

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe")
NEEDLES = 4  # needles of the multi-key / multi-value / multi-query tasks
QUERIES = 2  # keys asked for in multi-query
HOPS = 4  # variable-tracking chain: one assignment of the value, then this many copies
COMMON_WORDS = 10
VT_INTRO = "Memorize and track the chain of variable assignments hidden in the following text.\n"
CWE_INTRO = "Below is a numbered list of words. In these words, some appear more often than others.\n"
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def _key(rng) -> str:
    return f"{KEY_ADJECTIVES[rng.integers(len(KEY_ADJECTIVES))]}-{KEY_NOUNS[rng.integers(len(KEY_NOUNS))]}"


def _keys(rng, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    return keys


def _number(rng) -> str:
    return str(int(rng.integers(1_000_000, 10_000_000)))


def _word(rng, syllables: int = 3) -> str:
    return "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                   for _ in range(syllables))


def _haystack_sample(tokenizer, task: str, length: int, rng, intro: str, needles: list[str], question: str,
                     answer: str, bos_id: int | None) -> SyntheticSample:
    """Needles at random sentence boundaries of repeated filler, in the given order, to `length` tokens."""
    head = ([bos_id] if bos_id is not None else []) + _enc(tokenizer, intro)
    needle_ids = [_enc(tokenizer, n) for n in needles]
    question_ids = _enc(tokenizer, question)
    budget = length - len(head) - sum(map(len, needle_ids)) - len(question_ids)
    if budget < 0:
        raise UserError(f"length={length} is too short for the {task} task (needs at least {length - budget} tokens)")
    sentences = [e.ids for e in tokenizer.encode_batch([" " + s for s in split_sentences(FILLER)],
                                                       add_special_tokens=False)]
    hay: list[int] = []
    bounds = [0]
    while len(hay) < budget:
        hay.extend(sentences[(len(bounds) - 1) % len(sentences)])
        bounds.append(len(hay))
    hay = hay[:budget]
    bounds = [b for b in bounds if b <= budget]
    depths = np.sort(rng.uniform(0, 1, size=len(needles)))
    inserts = [min(bounds, key=lambda b, d=d: (abs(b - d * budget), b)) for d in depths]
    ids = list(head)
    previous = 0
    first_needle = None
    for at, nid in zip(inserts, needle_ids):
        ids += hay[previous:at]
        first_needle = len(ids) if first_needle is None else first_needle
        ids += nid
        previous = at
    ids += hay[previous:]
    question_start = len(ids)
    ids += question_ids
    return SyntheticSample(task=task, ids=np.asarray(ids, np.int32), answer=answer,
                           answer_ids=_enc(tokenizer, " " + answer), needle_start=first_needle,
                           needle_end=first_needle + len(needle_ids[0]), haystack_start=len(head),
                           question_start=question_start, depth=float(depths[0]), question=question.strip())


def _niah_question(keys: list[str], plural: bool) -> str:
    who = " and ".join(keys)
    if plural:
        return (f"\nWhat are all the special magic numbers for {who} mentioned in the provided text? "
                f"The special magic numbers for {who} mentioned in the provided text, in order, are")
    return (f"\nWhat is the special magic number for {who} mentioned in the provided text? "
            f"The special magic number for {who} mentioned in the provided text is")


def _needle(key: str, value: str) -> str:
    return f" One of the special magic numbers for {key} is: {value}."


def ruler_sample(tokenizer, task: str, length: int, seed: int, *, bos_id: int | None = None) -> SyntheticSample:
    """One RULER-style probe of exactly `length` tokens (before any chat template)."""
    rng = np.random.default_rng(seed)
    make = lambda *a: _haystack_sample(tokenizer, task, length, rng, *a, bos_id=bos_id)
    if task == "niah_single":
        key, value = _key(rng), _number(rng)
        return make(NIAH_INTRO, [_needle(key, value)], _niah_question([key], False), value)
    if task == "niah_multikey":  # distractor needles with other keys; the asked one is at a random place
        keys, values = _keys(rng, NEEDLES), [_number(rng) for _ in range(NEEDLES)]
        ask = int(rng.integers(NEEDLES))
        return make(NIAH_INTRO, [_needle(k, v) for k, v in zip(keys, values)], _niah_question([keys[ask]], False),
                    values[ask])
    if task == "niah_multivalue":  # one key, several numbers: all of them in order of appearance
        key, values = _key(rng), [_number(rng) for _ in range(NEEDLES)]
        return make(NIAH_INTRO, [_needle(key, v) for v in values], _niah_question([key], True), ", ".join(values))
    if task == "niah_multiquery":  # several keys asked at once: their numbers in the order asked
        keys, values = _keys(rng, NEEDLES), [_number(rng) for _ in range(NEEDLES)]
        asked = sorted(rng.choice(NEEDLES, size=QUERIES, replace=False).tolist())
        return make(NIAH_INTRO, [_needle(k, v) for k, v in zip(keys, values)],
                    _niah_question([keys[i] for i in asked], True), ", ".join(values[i] for i in asked))
    if task == "vt":
        names: list[str] = []
        while len(names) < HOPS + 1:
            name = "".join(chr(ord("A") + int(c)) for c in rng.integers(26, size=5))
            if name not in names:
                names.append(name)
        value = str(int(rng.integers(10_000, 100_000)))
        needles = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        question = (f"\nWhich variables are assigned the value {value} in the text above? According to the chain "
                    f"of variable assignments in the text above, the variables assigned the value {value}, in order, "
                    "are:")
        return make(VT_INTRO, needles, question, " ".join(names))
    if task == "cwe":
        return _cwe_sample(tokenizer, length, rng, bos_id)
    raise UserError(f"RULER task {task!r} is not one of {', '.join(TASKS)}")


def _cwe_sample(tokenizer, length: int, rng, bos_id: int | None) -> SyntheticSample:
    """Common-word extraction: a numbered word list where COMMON_WORDS words repeat often and the
    rest appear once; the answer lists the common words in order of first appearance."""
    head = ([bos_id] if bos_id is not None else []) + _enc(tokenizer, CWE_INTRO)
    question = (f"\nWhat are the {COMMON_WORDS} most common words in the above list? The {COMMON_WORDS} words that "
                "appear most often in the list, in order of first appearance, are:")
    question_ids = _enc(tokenizer, question)
    budget = length - len(head) - len(question_ids)
    per_item = 6  # about " 123. bakotu" in tokens; the list is trimmed to the budget below
    items_wanted = max(budget // per_item, COMMON_WORDS * 3)
    repeats = max(3, items_wanted // (4 * COMMON_WORDS))  # common words take about a quarter of the list
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < COMMON_WORDS + max(0, items_wanted - COMMON_WORDS * repeats):
        w = _word(rng)
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    common, rare = vocab[:COMMON_WORDS], vocab[COMMON_WORDS:]
    words = np.asarray(common * repeats + rare, dtype=object)
    words = words[rng.permutation(len(words))].tolist()

    def item_ids(ws):
        return [e.ids for e in tokenizer.encode_batch([f" {i + 1}. {w}" for i, w in enumerate(ws)],
                                                      add_special_tokens=False)]

    ids = item_ids(words)
    total = sum(map(len, ids))
    while total > budget:  # drop rare words from the end (then renumber) until the list fits
        rare_positions = [i for i in range(len(words) - 1, -1, -1) if words[i] not in common]
        if not rare_positions:
            raise UserError(f"length={length} is too short for the cwe task")
        dropped = set(rare_positions[: max(1, (total - budget) // per_item)])
        words = [w for i, w in enumerate(words) if i not in dropped]
        ids = item_ids(words)
        total = sum(map(len, ids))
    body = [t for item in ids for t in item]
    filler = _enc(tokenizer, " " + FILLER)
    body += (filler * (1 + (budget - len(body)) // max(1, len(filler))))[: budget - len(body)]
    answer = ", ".join(sorted(common, key=words.index))
    ids_all = np.asarray(head + body + question_ids, np.int32)
    return SyntheticSample(task="cwe", ids=ids_all, answer=answer, answer_ids=_enc(tokenizer, " " + answer),
                           needle_start=len(head), needle_end=len(head) + len(body), haystack_start=len(head),
                           question_start=len(head) + len(body), depth=0.0, question=question.strip())


def ruler_eval(logits_fn: LogitsFn, tokenizer, *, lengths: Sequence[int], tasks: Sequence[str] | None = None,
               samples: int = 1, seed: int = 0, chat: ChatWrap | None = None, bos_id: int | None = None,
               generate_fn=None) -> dict:
    """Exact-match accuracy per task and length; `by_task[task][length]`, `by_length` (mean of tasks)."""
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"RULER tasks {unknown} are not among {', '.join(TASKS)}")
    check_grid(lengths, [0.0])
    cells = []
    for ti, task in enumerate(tasks):
        def make(length: int, _depth: float, k: int, task=task, ti=ti):
            s = cell_seed(seed, length, ti, k)
            return build_to_length(lambda n: probe_from_sample(
                ruler_sample(tokenizer, task, n, s, bos_id=None if chat else bos_id), chat), length)

        for cell in run_grid(make, logits_fn, lengths=lengths, depths=[0.0], samples=samples, desc=f"ruler {task}",
                             generate_fn=generate_fn, tokenizer=tokenizer):
            cell["task"] = task
            cells.append(cell)
    result = summarize("ruler", cells, generate_fn is not None, tasks=tasks, chat=chat is not None, seed=seed)
    result["by_task"] = {t: {str(k): v for k, v in by_length([c for c in cells if c["task"] == t]).items()}
                         for t in tasks}
    return result
