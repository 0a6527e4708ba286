"""NIAH and passkey harness: an oracle that reads the needle scores 100%, models that cannot score
~0; the needle sits at the asked depth (±1 sentence) and the total length is the asked length
(chat template included); the Llama wrapper's tail logits equal the full forward (ring too);
bad input gives one-line errors with exit code 2."""

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from lwm_jax.cli import main
from lwm_jax.config import MeshConfig, ModelConfig
from lwm_jax.data.synthetic import niah_sample
from lwm_jax.eval.niah import Haystack, niah_eval, write_results
from lwm_jax.eval.passkey import passkey_eval
from lwm_jax.eval.probes import build_to_length, chat_wrap_for, probe_from_sample
from lwm_jax.eval.scoring import ModelLogits, wilson_interval
from lwm_jax.model.llama import Llama
from lwm_jax.model.opened import open_checkpoint
from lwm_jax.model.store import model_metadata, save_model
from lwm_jax.parallel.mesh import make_mesh
from tests.conftest import blind_logits, llama3_tokenizer_dir

LENGTH_TOLERANCE = 0.01  # total tokens within 1% of the asked length
ORACLE_SCORE = 1.0
BLIND_MAX_SCORE = 0.05  # a model that cannot read the needle scores at most this
LOGITS_ATOL = 1e-4  # float32 tail logits vs the full forward
LENGTHS = (300, 1000, 2500)
DEPTHS = (0.0, 0.3, 0.5, 0.9, 1.0)
HAYSTACK = " ".join(f"Paragraph {i} tells how the {w} river crossed the valley and met the sea at dawn."
                    for i, w in enumerate(["long", "wide", "quiet", "cold", "swift", "old"] * 60))


def _oracle(tokenizer, vocab: int):
    """Reads the needle whose key the question asks for and predicts its number."""
    def logits_fn(ids):
        text = tokenizer.decode(ids.tolist())
        key = re.search(r"special magic number for (\S+) mentioned", text).group(1)
        value = re.search(rf"special magic numbers for {re.escape(key)} is: (\d+)", text).group(1)
        answer = tokenizer.encode(" " + value, add_special_tokens=False).ids
        logits = np.zeros((len(answer) + 1, vocab), np.float32)
        logits[np.arange(len(answer)), answer] = 1.0
        return logits
    return logits_fn


@pytest.mark.parametrize("chat", [False, True])
def test_niah_oracle_and_blind(llama3_tokenizer, chat, tmp_path):
    tok, info = llama3_tokenizer
    stacks = [Haystack("test", HAYSTACK, tok)]
    kwargs = dict(lengths=LENGTHS, depths=DEPTHS, samples=2, haystacks=stacks, chat=chat_wrap_for(tok, info, chat),
                  bos_id=info.bos_id)
    oracle = niah_eval(_oracle(tok, info.vocab_size), tok, **kwargs)
    blind = niah_eval(blind_logits(info.vocab_size, 16), tok, **kwargs)
    assert oracle["score"] == ORACLE_SCORE and all(c["score"] == ORACLE_SCORE for c in oracle["cells"])
    assert blind["score"] <= BLIND_MAX_SCORE
    for cell in oracle["cells"]:
        for s in cell["samples"]:
            assert abs(s["tokens"] - cell["length"]) <= LENGTH_TOLERANCE * cell["length"]
    paths = write_results(oracle, tmp_path, "niah", "test", heatmap=True)
    assert json.loads(Path(paths["json"]).read_text())["score"] == 1.0
    assert Path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generated_answer_scoring(llama3_tokenizer, tmp_path):
    tok, info = llama3_tokenizer
    oracle = _oracle(tok, info.vocab_size)

    def generate_fn(prompt, max_new_tokens):  # greedy decoding of the oracle, then an end-of-turn
        answer = oracle(np.asarray(prompt)).argmax(-1)[:-1].tolist()
        return (answer + [info.eos_id])[:max_new_tokens]

    result = niah_eval(oracle, tok, lengths=(300,), depths=(0.0, 1.0), haystacks=[Haystack("t", HAYSTACK, tok)],
                       bos_id=info.bos_id, generate_fn=generate_fn)
    assert result["generated_score"] == 1.0 and result["generated_by_length"] == {"300": 1.0}
    assert "png_generated" in write_results(result, tmp_path, "niah", "t", heatmap=True)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("depth", DEPTHS)
def test_needle_depth_and_length(llama3_tokenizer, chat, depth):
    tok, info = llama3_tokenizer
    stack = Haystack("test", HAYSTACK, tok)
    longest_sentence = max(len(tok.encode(" " + s, add_special_tokens=False).ids) for s in stack.sentences)
    wrap = chat_wrap_for(tok, info, chat)
    length = 2000
    probe = build_to_length(lambda n: probe_from_sample(
        niah_sample(tok, n, depth, 3, haystack=stack.take(length), bos_id=None if chat else info.bos_id), wrap), length)
    assert abs(probe.length - length) <= LENGTH_TOLERANCE * length
    assert probe.prompt[0] == info.bos_id and (probe.prompt == info.bos_id).sum() == 1
    needle = tok.decode(probe.prompt[probe.needle_start:probe.needle_end].tolist())
    assert f"is: {probe.answer}." in needle
    # Depth: needle position inside the haystack part of the prompt, within one sentence.
    text_before = tok.decode(probe.prompt[:probe.needle_start].tolist())
    assert "magic numbers for" not in text_before
    assert abs(probe.actual_depth - depth) * length <= longest_sentence + 1
    if chat:
        text = tok.decode(probe.prompt.tolist(), skip_special_tokens=False)
        assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nThe special magic number for "
                             f"{text.split('magic number for ')[-1].split(' ')[0]} mentioned in the provided text is")


def test_passkey_oracle(llama3_tokenizer):
    tok, info = llama3_tokenizer

    def oracle(ids):
        key = re.search(r"The pass key is (\d+)\. Remember it", tok.decode(ids.tolist())).group(1)
        answer = tok.encode(" " + key, add_special_tokens=False).ids
        logits = np.zeros((len(answer) + 1, info.vocab_size), np.float32)
        logits[np.arange(len(answer)), answer] = 1.0
        return logits

    result = passkey_eval(oracle, tok, lengths=(200, 800), depths=(0.0, 0.5, 1.0), samples=2, bos_id=info.bos_id)
    assert result["score"] == 1.0 and set(result["by_length"]) == {"200", "800"}
    blind = passkey_eval(blind_logits(info.vocab_size, 16), tok, lengths=(200, 800), samples=2, bos_id=info.bos_id)
    assert blind["score"] <= BLIND_MAX_SCORE


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random tiny Llama checkpoint with Llama-3's vocabulary size (so real token ids fit)."""
    config = ModelConfig(vocab_size=128_256, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8, max_position_embeddings=4096, remat="none",
                         tie_word_embeddings=True)
    model = Llama(config, nnx.Rngs(0))
    return save_model(tmp_path_factory.mktemp("ckpt") / "c", model,
                      model_metadata(config, recipe="probe_test", stage="x4", seq_len=1024))


def test_model_logits_tail_matches_full_forward_ring(tiny_ckpt):
    model = open_checkpoint(tiny_ckpt).model()
    ids = np.random.default_rng(0).integers(0, 128_000, size=61).astype(np.int32)  # odd: padded to 64 for the ring
    full = np.asarray(model(ids[None]))[0]
    np.testing.assert_allclose(ModelLogits(model, tail=8)(ids), full[-8:], atol=LOGITS_ATOL)
    mesh = make_mesh(MeshConfig.parse("dp=2,sp=4"))
    with jax.set_mesh(mesh):
        ring = open_checkpoint(tiny_ckpt, mesh, attention="ring").model()
        ring_tail = ModelLogits(ring, mesh=mesh, tail=8)(ids)
    np.testing.assert_allclose(ring_tail, full[-8:], atol=LOGITS_ATOL)


@pytest.mark.parametrize("hits,n", [(0, 40), (40, 40), (17, 40), (3, 10), (1, 1), (500, 1000)])
def test_wilson_interval_solves_the_score_equation(hits, n):
    """Both ends p0 of the Wilson interval solve (p - p0)^2 = z^2 p0 (1 - p0) / n, the interval holds
    p = hits/n, and at 0 hits its top is z^2 / (n + z^2) (the closed form)."""
    z = 1.959964
    lo, hi = wilson_interval(hits, n)
    p = hits / n
    assert 0.0 <= lo <= p <= hi <= 1.0 and lo < hi
    for p0 in (lo, hi):
        assert (p - p0) ** 2 == pytest.approx(z * z * p0 * (1 - p0) / n, abs=1e-12)
    if hits == 0:
        assert hi == pytest.approx(z * z / (n + z * z), rel=1e-12)


def test_cli_niah_and_bad_input(tiny_ckpt, tmp_path, capsys):
    hay = tmp_path / "hay.txt"
    hay.write_text(HAYSTACK)
    tok_dir = str(llama3_tokenizer_dir())
    base = ["eval", "niah", str(tiny_ckpt), "--tokenizer", tok_dir, "--haystack", str(hay)]
    assert main([*base, "--lengths", "256", "--depths", "0,50,100", "--samples", "2", "--out", str(tmp_path / "o"),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["score"] <= BLIND_MAX_SCORE and (tmp_path / "o" / "niah.png").is_file()
    # The heatmap is titled with the model, stage, theta and lengths, not the folder name.
    assert result["title"] == "niah: probe_test stage x4, theta 500,000, trained at 1,024, scored at 256"
    assert result["interval_by_length"]["256"]["probes"] == 6
    cells = json.loads((tmp_path / "o" / "niah.json").read_text())["cells"]
    assert len(cells) == 3 and all(len(c["samples"]) == 2 and c["samples"][0]["tokens"] == 256 for c in cells)
    # RULER through the CLI: task x length heatmap.
    assert main(["eval", "ruler", str(tiny_ckpt), "--tokenizer", tok_dir, "--lengths", "256",
                 "--tasks", "niah_multikey,vt,cwe", "--out", str(tmp_path / "r"), "--json"]) == 0
    ruler = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(ruler["by_task"]) == {"niah_multikey", "vt", "cwe"} and ruler["score"] <= BLIND_MAX_SCORE
    assert (tmp_path / "r" / "ruler.png").is_file()
    assert main(["eval", "ruler", str(tiny_ckpt), "--tokenizer", tok_dir, "--lengths", "256", "--tasks", "nope",
                 "--out", str(tmp_path / "r")]) == 2
    assert "not among" in capsys.readouterr().err
    # A length beyond what the model holds.
    assert main([*base, "--lengths", "8192", "--out", str(tmp_path / "o2")]) == 2
    assert "beyond what this model/mesh holds" in capsys.readouterr().err
    # A haystack shorter than one sample.
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here. Not many at all.")
    assert main(["eval", "niah", str(tiny_ckpt), "--tokenizer", tok_dir, "--haystack", str(short),
                 "--lengths", "512", "--out", str(tmp_path / "o3")]) == 2
    assert "shorter than one sample" in capsys.readouterr().err
    # --chat with a tokenizer that has no chat template.
    plain = tmp_path / "plain_tok"
    plain.mkdir()
    shutil.copy(llama3_tokenizer_dir() / "tokenizer.json", plain / "tokenizer.json")
    (plain / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                             "eos_token": "<|end_of_text|>"}))
    assert main(["eval", "passkey", str(tiny_ckpt), "--tokenizer", str(plain), "--chat", "--lengths", "256",
                 "--out", str(tmp_path / "o4")]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and len(err.strip().splitlines()) == 1



def test_cli_log_n_temperature_and_its_bad_input(tiny_ckpt, tmp_path, capsys):
    """--temperature log-n is named in the result and the title (its numbers:
    tests/test_rope_scaling.py); with --generate it is one error line, before any output."""
    base = ["eval", "passkey", str(tiny_ckpt), "--tokenizer", str(llama3_tokenizer_dir()), "--depths", "50",
            "--max-length", "2048", "--temperature", "log-n"]
    assert main([*base, "--lengths", "256,2048", "--out", str(tmp_path / "t"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["temperature"] == "log-n" and set(result["by_length"]) == {"256", "2048"}
    assert result["title"].endswith("scored at 256, 2K, log-n temperature past the trained length")
    assert main([*base, "--lengths", "2048", "--generate", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "leave out --generate" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g").exists()
