"""KV-cache generation against `transformers` greedy `generate`: one device, the ring prefill with
the cache sharded over sp=4 (through the CLI), the Llama-3 chat template; and the CLI's bad input."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lwm_jax import generate as G
from lwm_jax.cli import main
from lwm_jax.config import MeshConfig
from lwm_jax.convert.hf import import_hf
from lwm_jax.generate import encode_prompt, generate
from lwm_jax.parallel.mesh import make_mesh
from tests.conftest import make_hf_llama, require_llama3_tokenizer

NEW_TOKENS = 32  # decode steps compared token for token, each reading the cache the steps before it wrote
MIN_DISTINCT = 8  # the reference continuation must not be degenerate (one token repeated)
PROMPT_LEN = 37  # not a multiple of 2*sp: the prefill pads


def _hf_greedy(model, prompt, new_tokens):
    model.generation_config.eos_token_id = None  # run the full length, as generate(stop_ids=()) does
    with torch.no_grad():
        ids = torch.tensor(np.asarray(prompt)[None])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny HF Llama (vocab 256), its lwm-jax checkpoint, a prompt and HF's greedy tokens."""
    root = tmp_path_factory.mktemp("gen")
    hf = make_hf_llama(root / "hf", seed=0)
    prompt = np.concatenate([[0], np.random.default_rng(0).integers(2, 256, PROMPT_LEN - 1)]).astype(np.int32)
    expected = _hf_greedy(hf, prompt, NEW_TOKENS)
    assert len(set(expected)) >= MIN_DISTINCT, expected
    assert main(["import-hf", str(root / "hf"), str(root / "ckpt")]) == 0
    np.save(root / "prompt.npy", prompt)
    return {"root": root, "hf": hf, "prompt": prompt, "expected": expected}


def test_greedy_matches_transformers_single_device(tiny):
    model = import_hf(tiny["root"] / "hf")
    assert generate(model, tiny["prompt"], max_new_tokens=NEW_TOKENS) == tiny["expected"]
    # Sampling: a top-p mass below the top token's probability keeps only it, so it is greedy.
    assert generate(model, tiny["prompt"], max_new_tokens=NEW_TOKENS, greedy=False, top_p=1e-6,
                    seed=3) == tiny["expected"]
    # Seeded: the same seed repeats, another seed differs (random model: sampling is not greedy).
    sample = lambda seed: generate(model, tiny["prompt"], max_new_tokens=NEW_TOKENS, greedy=False,
                                   temperature=1.5, top_p=0.9, seed=seed)
    first = sample(0)
    assert first == sample(0) and first != sample(1) and first != tiny["expected"]


def test_greedy_matches_transformers_sp4_ring_cli(tiny, capsys):
    """`--mesh dp=2,sp=4`: ring prefill in zigzag order, decode over the cache sharded over sp=4."""
    rc = main(["generate", str(tiny["root"] / "ckpt"), "--tokens", str(tiny["root"] / "prompt.npy"),
               "--mesh", "dp=2,sp=4", "--max-new-tokens", str(NEW_TOKENS), "--greedy", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = tiny["expected"]
    if 1 in expected:  # the CLI stops at the model's EOS (id 1) and keeps it, as transformers does
        expected = expected[: expected.index(1) + 1]
    assert result["new_tokens"] == expected
    assert "text" not in result  # no tokenizer, no text


def test_chat_greedy_matches_transformers(tmp_path):
    """`--chat` renders the Llama-3 template as transformers does, then decodes as transformers."""
    tok_dir = require_llama3_tokenizer()
    message = "What is the capital of France?"
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    text = hf_tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                      add_generation_prompt=True)
    hf_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    ids, _ = encode_prompt(message, tok_dir, chat=True)
    assert ids == hf_ids and hf_ids[0] == hf_tok.convert_tokens_to_ids("<|begin_of_text|>")

    hf = make_hf_llama(tmp_path / "hf", seed=1, vocab_size=128_256, hidden_size=32, intermediate_size=64,
                       num_heads=4, num_kv_heads=2)
    expected = _hf_greedy(hf, ids, NEW_TOKENS)
    assert len(set(expected)) >= MIN_DISTINCT, expected
    stops = {1, hf_tok.convert_tokens_to_ids("<|eot_id|>")}  # the model's EOS and the turn end
    cut = next((i + 1 for i, t in enumerate(expected) if t in stops), len(expected))
    model = import_hf(tmp_path / "hf")
    assert generate(model, ids, max_new_tokens=NEW_TOKENS, stop_ids=stops) == expected[:cut]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lwm-jax: error: "), err
    return err[0]


def test_length_beyond_what_the_mesh_holds(tiny, capsys):
    rc = main(["generate", str(tiny["root"] / "ckpt"), "--tokens", str(tiny["root"] / "prompt.npy"),
               "--mesh", "dp=2,sp=4", "--max-new-tokens", "100000", "--device-memory", "0.001"])
    assert rc == 2
    line = _one_error_line(capsys)
    assert "per device with sp=4" in line and "100,000 new tokens" in line and "larger sp" in line


def test_chat_without_template(tiny, tmp_path, capsys):
    tok_dir = require_llama3_tokenizer()
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    rc = main(["generate", str(tiny["root"] / "ckpt"), "--prompt", "hi", "--tokenizer", str(tmp_path), "--chat"])
    assert rc == 2
    assert "has no chat template" in _one_error_line(capsys)


def test_sharded_decode_never_moves_the_cache(tiny):
    """sp=4 on 4 of the devices (API): the same tokens, and the compiled decode step holds no
    all-gather and no collective-permute, only all-reduces of softmax partials (flash-decoding)."""
    mesh = make_mesh(MeshConfig(sp=4), devices=jax.devices()[:4])
    model = G.place_model(import_hf(tiny["root"] / "hf", attention="ring"), mesh)
    plan = G.cache_spec(model.config, len(tiny["prompt"]), NEW_TOKENS, mesh)
    logits, cache = G.prefill(model, tiny["prompt"], plan, mesh)
    assert cache[0].sharding.spec[2] == "sp"
    out, count = G.decode(model, cache, logits, plan, mesh=mesh)
    assert np.asarray(out)[: int(count)].tolist() == tiny["expected"]
    hlo = G.loop._decode.lower(model, cache, logits, jnp.int32(plan.prompt_len), jax.random.key(0),
                          jnp.asarray([-1], jnp.int32), jnp.float32(1), jnp.float32(1),
                          max_new_tokens=NEW_TOKENS, greedy=True, mesh=mesh).compile().as_text()
    assert re.search(r"\ball-reduce(-start)?\(", hlo)
    for op in ("all-gather", "collective-permute", "all-to-all"):
        assert not re.search(rf"\b{op}(-start)?\(", hlo), op
