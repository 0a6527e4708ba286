"""Passkey and needle-in-a-haystack probes: exact token length, needle at the requested depth,
answer inside the needle, seeded, for the Llama-3 tokenizer and for a small BPE made here."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lwm_jax.data.synthetic import FILLER, niah_sample, passkey_sample
from lwm_jax.data.tokenize import get_tokenizer
from lwm_jax.errors import UserError
from tests.conftest import require_llama3_tokenizer


def _tiny_bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The grass is green. The sky is blue. The pass key is 12345. Magic numbers for words."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module", params=["llama3", "tiny_bpe"])
def tokenizer(request):
    if request.param == "tiny_bpe":
        return _tiny_bpe(), None

    return get_tokenizer(str(require_llama3_tokenizer() / "tokenizer.json")), 128000


@pytest.mark.parametrize("make", [passkey_sample, niah_sample])
@pytest.mark.parametrize("length", [700, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_exact_length_and_depth(tokenizer, make, length, depth):
    tok, bos = tokenizer
    sample = make(tok, length, depth, seed=11, bos_id=bos)
    assert sample.ids.dtype == np.int32 and len(sample.ids) == length
    if bos is not None:
        assert sample.ids[0] == bos
    needle = tok.decode(sample.ids[sample.needle_start:sample.needle_end].tolist())
    assert sample.answer in needle
    assert tok.decode(sample.answer_ids).strip() == sample.answer
    # The needle sits at the sentence boundary nearest the requested depth of the haystack.
    haystack = sample.question_start - sample.haystack_start - (sample.needle_end - sample.needle_start)
    sentence = max(len(tok.encode(" " + s, add_special_tokens=False).ids) for s in FILLER.split(". "))
    # Half a sentence away at most; at depth 1 a whole one (the haystack's last sentence is cut short).
    assert abs(sample.actual_depth - depth) * haystack <= (sentence if depth == 1.0 else sentence / 2 + 1)
    assert tok.decode(sample.ids[sample.question_start:].tolist()).strip() == sample.question
    full = tok.decode(sample.ids.tolist())
    assert full.rstrip().endswith("is")  # the prompt ends where the answer continues


def test_seeded(tokenizer):
    tok, bos = tokenizer
    a = niah_sample(tok, 500, 0.3, seed=5, bos_id=bos)
    b = niah_sample(tok, 500, 0.3, seed=5, bos_id=bos)
    assert np.array_equal(a.ids, b.ids) and a.answer == b.answer
    keys = {passkey_sample(tok, 200, 0.5, seed=s).answer for s in range(10)}
    assert len(keys) >= 9


def test_custom_haystack(tokenizer):
    tok, bos = tokenizer
    hay = "Alpha beta gamma. Delta epsilon! Zeta eta theta? Iota kappa lambda."
    sample = niah_sample(tok, 400, 0.5, seed=1, haystack=hay, bos_id=bos)
    text = tok.decode(sample.ids.tolist())
    assert "Delta epsilon" in text and "grass" not in text and len(sample.ids) == 400


def test_bad_arguments(tokenizer):
    tok, _ = tokenizer
    with pytest.raises(UserError, match="too short"):
        passkey_sample(tok, 20, 0.5, seed=0)
    with pytest.raises(UserError, match="depth=1.5"):
        niah_sample(tok, 1000, 1.5, seed=0)
    with pytest.raises(UserError, match="haystack text is empty"):
        niah_sample(tok, 1000, 0.5, seed=0, haystack="   ")
