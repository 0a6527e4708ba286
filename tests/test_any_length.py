"""Any sequence length on any mesh: `eval ppl` (--tokens, --data), rows of different lengths,
generation, a passkey probe and a theta sweep at lengths that are not multiples of the ring's
2*sp*block, each against its oracle (transformers, or the one-device forward); padding is masked
(own segment id, loss weight 0), so it is never scored. A training seq_len stays constrained, and
its error names the nearest valid lengths."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from lwm_jax.cli import main
from lwm_jax.config import MeshConfig, ModelConfig, load_recipe
from lwm_jax.convert.hf import import_hf
from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info
from lwm_jax.errors import UserError
from lwm_jax.eval.passkey import passkey_eval
from lwm_jax.eval.perplexity import mean_nll, nll_by_position
from lwm_jax.eval.scoring import ModelLogits
from lwm_jax.eval.theta_sweep import theta_sweep
from lwm_jax.model.llama import Llama
from lwm_jax.model.opened import open_checkpoint
from lwm_jax.model.store import merge_params
from lwm_jax.parallel.mesh import make_mesh, state_shardings
from lwm_jax.train.schedule import schedule_recipe
from tests.conftest import ROOT, make_hf_llama, require_llama3_tokenizer

NLL_ATOL = 1e-5  # float32 mean NLL vs transformers: float32 sums over ~2K tokens stay below it
LOGITS_ATOL = 1e-4  # float32 logits of the ring (sp=4) vs the one-device forward (the project's whole-model bound)
ODD_LEN = 1025  # 2*sp = 8 does not divide it: the ring pads to 1,032
ROW_LENGTHS = (1025, 700, 3)  # three rows on dp=2: the batch pads by one empty row, each row to 1,032
PROMPT_LEN, NEW_TOKENS = 1000, 16
PASSKEY_LEN = 1001
EOS = 1  # make_hf_llama's eos_token_id


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "lwm_jax.cli", *argv], capture_output=True, text=True, timeout=300)


def _hf_nll(hf, rows) -> tuple[np.ndarray, np.ndarray]:
    """(per-row NLL sums, per-row predicted counts) of transformers' model, float64."""
    sums = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor(np.asarray(row, np.int64)[None])
            logits = hf(ids).logits[0, :-1].double()
            sums.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item())
    return np.asarray(sums), np.asarray([len(r) - 1 for r in rows])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random transformers Llama (vocab 256, hidden 64, 2 layers), its lwm-jax checkpoint and token files."""
    root = tmp_path_factory.mktemp("any")
    hf = make_hf_llama(root / "hf", seed=0)
    assert main(["import-hf", str(root / "hf"), str(root / "ckpt")]) == 0
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, n).astype(np.int32) for n in ROW_LENGTHS]
    np.save(root / "one.npy", rows[0])  # 1-D: one sequence of ODD_LEN tokens (batch 1 on dp=2)
    return {"root": root, "hf": hf, "ckpt": str(root / "ckpt"), "rows": rows}


@pytest.fixture(scope="module")
def ring(tiny):
    """The checkpoint with ring attention on the dp=2, sp=4 mesh of the 8 simulated devices."""
    mesh = make_mesh(MeshConfig.parse("dp=2,sp=4"))
    with jax.set_mesh(mesh):
        model = open_checkpoint(tiny["ckpt"], mesh, attention="ring").model()
    return model, mesh


def test_eval_ppl_cli_odd_length_ring_matches_transformers(tiny, capsys):
    """A 1,025-token file (the ring pads it to 1,032) on `--attention ring --mesh dp=2,sp=4` (a subprocess)."""
    proc = _cli("--cpu-devices", "8", "eval", "ppl", tiny["ckpt"], "--tokens", str(tiny["root"] / "one.npy"),
                "--attention", "ring", "--mesh", "dp=2,sp=4", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    sums, counts = _hf_nll(tiny["hf"], tiny["rows"][:1])
    assert result["tokens"] == ODD_LEN - 1
    assert abs(result["mean_nll"] - sums[0] / counts[0]) <= NLL_ATOL
    # --data: three 1,025-token sequences cut from a flat token file (3 rows on dp=2), by position.
    flat = np.concatenate([tiny["rows"][0]] * 3)
    np.save(tiny["root"] / "flat.npy", flat)
    assert main(["eval", "ppl", tiny["ckpt"], "--data", str(tiny["root"] / "flat.npy"), "--seq-len", str(ODD_LEN),
                 "--num-sequences", "3", "--attention", "ring", "--mesh", "dp=2,sp=4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert data["tokens"] == 3 * (ODD_LEN - 1) and sum(b["tokens"] for b in data["buckets"]) == data["tokens"]
    assert abs(data["mean_nll"] - sums[0] / counts[0]) <= NLL_ATOL


@pytest.mark.parametrize("on_mesh", [False, True], ids=["blockwise-1-device", "ring-dp2-sp4"])
def test_rows_of_different_lengths(tiny, ring, on_mesh):
    """Rows of 1,025, 700 and 3 tokens in one batch: every row padded to the longest (and the batch
    to dp), the padding never scored; overall and per-bucket means equal transformers' row by row."""
    rows = tiny["rows"]
    sums, counts = _hf_nll(tiny["hf"], rows)
    edges = [0, 512, ODD_LEN]
    if on_mesh:
        model, mesh = ring
        with jax.set_mesh(mesh):
            nll, count = mean_nll(model, rows, mesh)
            buckets = nll_by_position(model, rows, edges, mesh)
    else:
        model = import_hf(tiny["root"] / "hf")
        nll, count = mean_nll(model, rows)
        buckets = nll_by_position(model, rows, edges)
    assert count == counts.sum() and buckets["tokens"] == counts.sum()
    assert abs(nll - sums.sum() / counts.sum()) <= NLL_ATOL
    assert abs(buckets["mean_nll"] - nll) <= NLL_ATOL
    # The second bucket (predictions at positions 512..1024) holds the real tails of the two long rows.
    first, second = buckets["buckets"]
    assert second["tokens"] == sum(max(0, n - 1 - 512) for n in ROW_LENGTHS)
    assert first["tokens"] == counts.sum() - second["tokens"]


def test_generate_1000_token_prompt_sp4_matches_transformers(tiny):
    """Greedy generation through `lwm-jax generate --mesh sp=4` (ring prefill of a prompt padded
    from 1,000 tokens, decode over the cache sharded over sp) equals transformers token for token."""
    prompt = np.concatenate([[0], np.random.default_rng(1).integers(2, 256, PROMPT_LEN - 1)]).astype(np.int32)
    np.save(tiny["root"] / "prompt.npy", prompt)
    hf = tiny["hf"]
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ids = torch.tensor(prompt[None].astype(np.int64))
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=0)
    expected = out[0, PROMPT_LEN:].tolist()
    if EOS in expected:  # the CLI stops at the model's EOS and keeps it, as transformers does
        expected = expected[: expected.index(EOS) + 1]
    proc = _cli("--cpu-devices", "4", "generate", tiny["ckpt"], "--tokens", str(tiny["root"] / "prompt.npy"),
                "--mesh", "sp=4", "--max-new-tokens", str(NEW_TOKENS), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["new_tokens"] == expected


def test_passkey_at_odd_length_on_sp4():
    """A passkey probe of 1,001 tokens on a ring over sp=4: it runs, and the tail logits it was
    scored with equal the one-device forward's."""
    info = load_tokenizer_info(require_llama3_tokenizer())
    tok = get_tokenizer(info.tokenizer_file)
    config = ModelConfig(vocab_size=128_256, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8, max_position_embeddings=2048, remat="none",
                         tie_word_embeddings=True)
    # Random params drawn with numpy: initialising a 128K-vocab Llama through jax.random is slow on CPU.
    rng = np.random.default_rng(0)
    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0)))))
    params = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32), shapes)
    model = merge_params(config, params)
    mesh = make_mesh(MeshConfig.parse("sp=4"), devices=jax.devices()[:4])
    graphdef, state = nnx.split(merge_params(config.replace(attention="ring"), params))
    with jax.set_mesh(mesh):
        scorer = ModelLogits(nnx.merge(graphdef, jax.device_put(state, state_shardings(mesh, state))), mesh)
        seen = []

        def logits_fn(ids):
            seen.append((ids, scorer(ids)))
            return seen[-1][1]

        result = passkey_eval(logits_fn, tok, lengths=(PASSKEY_LEN,), depths=(0.5,), bos_id=info.bos_id)
    assert set(result["by_length"]) == {str(PASSKEY_LEN)}
    ids, tail = seen[0]
    assert len(ids) % 8, len(ids)  # the probe was not a multiple of 2*sp: the scorer padded it
    oracle = np.asarray(model.logits(model.hidden(ids[None])[:, -len(tail):]))[0]  # one device, no padding
    np.testing.assert_allclose(tail, oracle, atol=LOGITS_ATOL)


def test_theta_sweep_at_odd_length(tiny, ring):
    """A sweep at context 1,025 over 3 sequences on dp=2, sp=4: the trained theta's point is
    transformers' NLL, another theta's is not."""
    model, mesh = ring
    tokens = np.stack([tiny["rows"][0]] * 2 + [tiny["rows"][0][::-1]])
    sums, counts = _hf_nll(tiny["hf"], list(tokens))
    trained = model.config.rope_theta
    with jax.set_mesh(mesh):
        result = theta_sweep(model, tokens, context=ODD_LEN, candidates=[trained / 100, trained], mesh=mesh)
    at = {p["theta"]: p["mean_nll"] for p in result["points"]}
    assert abs(at[trained] - sums.sum() / counts.sum()) <= NLL_ATOL
    assert abs(at[trained / 100] - at[trained]) > 100 * NLL_ATOL


def test_training_seq_len_error_names_nearest_lengths():
    recipe = load_recipe(ROOT / "configs/recipes/demo_cpu.yaml", ["stages.base.seq_len=1025"])
    with pytest.raises(UserError, match="nearest valid lengths are 1,024 or 2,048"):
        schedule_recipe(recipe, 8, check_sources=False)
