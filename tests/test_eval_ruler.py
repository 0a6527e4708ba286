"""RULER subset: every task is answerable from its context (an oracle that parses the prompt scores
100%, plain and with the chat template), a blind model scores ~0, lengths are exact (the CLI run,
writing the task x length heatmap, is in test_eval_niah next to its checkpoint)."""

import collections
import re

import numpy as np
import pytest

from lwm_jax.eval.probes import chat_wrap_for
from lwm_jax.eval.ruler import COMMON_WORDS, TASKS, ruler_eval, ruler_sample
from tests.conftest import blind_logits

ORACLE_SCORE = 1.0
BLIND_MAX_SCORE = 0.05
LENGTH_TOLERANCE = 0.01
LENGTHS = (400, 1500)


def _answer(text: str) -> str:
    """What a perfect reader answers, found by parsing the prompt only."""
    if "numbered list of words" in text:
        words = re.findall(r"\d+\. ([a-z]+)", text)
        counts = collections.Counter(words)
        top = [w for w, _ in counts.most_common(10)]
        return ", ".join(sorted(top, key=words.index))
    if "chain of variable assignments" in text:
        value = re.search(r"assigned the value (\d+) in the text above", text).group(1)
        chain = [re.search(rf"VAR (\w+) = {value}\.", text).group(1)]
        while m := re.search(rf"VAR (\w+) = VAR {chain[-1]}\.", text):
            chain.append(m.group(1))
        return " ".join(chain)
    needles = re.findall(r"special magic numbers for (\S+) is: (\d+)\.", text)
    keys = re.search(r"magic numbers? for (.+?) mentioned in the provided text\?", text).group(1).split(" and ")
    return ", ".join(v for key in keys for k, v in needles if k == key)


def _oracle(tok, vocab):
    def logits_fn(ids):
        answer = tok.encode(" " + _answer(tok.decode(ids.tolist())), add_special_tokens=False).ids
        logits = np.zeros((len(answer) + 1, vocab), np.float32)
        logits[np.arange(len(answer)), answer] = 1.0
        return logits
    return logits_fn


@pytest.mark.parametrize("chat", [False, True])
def test_ruler_oracle_and_blind(llama3_tokenizer, chat):
    tok, info = llama3_tokenizer
    kwargs = dict(lengths=LENGTHS, samples=2, chat=chat_wrap_for(tok, info, chat), bos_id=info.bos_id)
    result = ruler_eval(_oracle(tok, info.vocab_size), tok, **kwargs)
    assert set(result["by_task"]) == set(TASKS)
    assert result["score"] == ORACLE_SCORE, {t: v for t, v in result["by_task"].items()}
    for cell in result["cells"]:
        for s in cell["samples"]:
            assert abs(s["tokens"] - cell["length"]) <= LENGTH_TOLERANCE * cell["length"]
    blind = ruler_eval(blind_logits(info.vocab_size, 64), tok, **kwargs)
    assert blind["score"] <= BLIND_MAX_SCORE


def test_cwe_common_words_are_well_defined(llama3_tokenizer):
    tok, info = llama3_tokenizer
    sample = ruler_sample(tok, "cwe", 3000, seed=4, bos_id=info.bos_id)
    assert len(sample.ids) == 3000
    words = re.findall(r"\d+\. ([a-z]+)", tok.decode(sample.ids.tolist()))
    counts = sorted(collections.Counter(words).values(), reverse=True)
    assert counts[COMMON_WORDS - 1] > counts[COMMON_WORDS]  # a strict gap below the top 10
