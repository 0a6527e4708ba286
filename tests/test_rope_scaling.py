"""RoPE scaling methods (linear, yarn, llama3) against transformers on models transformers made
itself, at positions past `original_max_position_embeddings`: import, export and reload, mean NLL,
llama.cpp through GGUF, stage options and sweeps of a method's scalar, and refused bad input."""

import importlib.util
import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from llama_cpp import Llama as LlamaCpp
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lwm_jax.cli import main
from lwm_jax.config import ModelConfig, RecipeConfig, RopeScaling, StageConfig, from_dict, load_recipe
from lwm_jax.convert.gguf import add_rope_scaling
from lwm_jax.convert.hf import export_hf, import_hf
from lwm_jax.errors import UserError
from lwm_jax.eval.perplexity import mean_nll
from lwm_jax.eval.scoring import LengthTempered, ModelLogits
from lwm_jax.eval.theta_sweep import theta_sweep, with_value
from lwm_jax.model.rope import (
    attention_factor,
    inv_frequencies,
    length_temperature,
    model_inv_frequencies,
    model_rope_scale,
    with_attention_temperature,
)
from lwm_jax.model.store import merge_params
from lwm_jax.train.schedule import schedule_recipe
from tests.conftest import ROOT, cli_error, llama3_tokenizer_dir, make_hf_llama, require_llama3_tokenizer

LOGIT_TOL = 1e-4  # float32 whole model against transformers (ARCHITECTURE.md)
NLL_REL_TOL = 1e-5  # mean NLL at 4x the original context, relative: the float32 means (~5.9) are 2 ulps, 1.6e-7, apart
GGUF_LOGIT_TOL = 1e-3  # llama.cpp f32 with an f32 KV cache against ours (as tests/test_gguf.py)
OP_TOL = 1e-5  # single ops (inverse frequencies)
MATTERS = 100 * LOGIT_TOL  # the scaling must move the logits far more than the tolerance
ORIG, SEQ, THETA = 32, 128, 10_000.0  # 4x the original context
METHODS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG},
    "yarn-betas-attention": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG,
                             "beta_fast": 8.0, "beta_slow": 2.0, "attention_factor": 1.3},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG,
                    "mscale": 1.0, "mscale_all_dim": 0.5},
    "yarn-untruncated": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG,
                         "truncate": False},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIG},
}
GGUF_METHODS = ("linear", "yarn", "yarn-betas-attention", "yarn-mscale")
LLAMA3_VOCAB = 128_256
GGML_TYPE_F32 = 0


def _tokens(batch=2, vocab=256):
    return np.random.default_rng(1).integers(0, vocab, size=(batch, SEQ))


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _ours(model, tokens):
    return np.asarray(model(jnp.asarray(tokens)))


@pytest.mark.parametrize("method", METHODS)
def test_inverse_frequencies_and_attention_factor_match_transformers(method):
    scaling = METHODS[method]
    config = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_theta=THETA, rope_scaling=dict(scaling),
                         max_position_embeddings=SEQ)
    theirs, their_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    ours = RopeScaling(**scaling)
    np.testing.assert_allclose(inv_frequencies(128, THETA, ours), theirs.double().numpy(), rtol=OP_TOL)
    assert attention_factor(ours) == pytest.approx(their_factor, rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_logits_match_transformers_past_the_original_context(tmp_path, method):
    hf_model = make_hf_llama(tmp_path / "hf", rope_theta=THETA, rope_scaling=dict(METHODS[method]),
                             max_position_embeddings=SEQ)
    tokens = _tokens()
    ours_model = import_hf(tmp_path / "hf")
    assert ours_model.config.rope_scaling == RopeScaling(**METHODS[method])
    ours = _ours(ours_model, tokens)
    assert np.abs(ours - _torch_logits(hf_model, tokens)).max() <= LOGIT_TOL
    plain = _ours(merge_params(ours_model.config.replace(rope_scaling=None), _params(ours_model)), tokens)
    assert np.abs(ours - plain).max() > MATTERS  # the method changes the logits past ORIG


def _params(model):
    return nnx.to_pure_dict(nnx.state(model))


@pytest.mark.parametrize("form", ["4.x-type", "4.x-rope_type", "5.x"])
def test_both_config_forms_read_the_same(tmp_path, form):
    scaling = dict(METHODS["yarn-betas-attention"])
    hf_model = make_hf_llama(tmp_path, rope_theta=THETA, rope_scaling=dict(scaling), max_position_embeddings=SEQ)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("rope_parameters", {}).get("rope_type") == "yarn"  # transformers 5 writes rope_parameters
    if form != "5.x":
        config.pop("rope_parameters")
        key = "type" if form == "4.x-type" else "rope_type"
        config.update(rope_theta=THETA, rope_scaling={key: scaling.pop("rope_type"), **scaling})
        (tmp_path / "config.json").write_text(json.dumps(config))
    tokens = _tokens(1)
    assert np.abs(_ours(import_hf(tmp_path), tokens) - _torch_logits(hf_model, tokens)).max() <= LOGIT_TOL


@pytest.mark.parametrize("method", ["linear", "yarn-betas-attention", "llama3"])
def test_export_then_transformers_load_gives_the_same_logits(tmp_path, method):
    make_hf_llama(tmp_path / "hf", rope_theta=THETA, rope_scaling=dict(METHODS[method]), max_position_embeddings=SEQ)
    model = import_hf(tmp_path / "hf")
    export_hf(model, tmp_path / "out", dtype="float32")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_scaling"] == METHODS[method] and config["rope_theta"] == THETA
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    tokens = _tokens()
    assert np.abs(_torch_logits(reloaded, tokens) - _ours(model, tokens)).max() <= LOGIT_TOL


def test_yarn_mean_nll_at_four_times_the_original_context(tmp_path):
    hf_model = make_hf_llama(tmp_path, rope_theta=THETA, rope_scaling=dict(METHODS["yarn"]),
                             max_position_embeddings=SEQ)
    tokens = _tokens(4)
    with torch.no_grad():
        theirs = float(hf_model(torch.as_tensor(tokens), labels=torch.as_tensor(tokens)).loss)
    ours, count = mean_nll(import_hf(tmp_path), tokens)
    assert count == 4 * (SEQ - 1)
    assert abs(ours - theirs) <= NLL_REL_TOL * abs(theirs)


# GGUF / llama.cpp ------------------------------------------------------------------------------


def _llama_cpp_logits(path, tokens):
    llm = LlamaCpp(model_path=str(path), n_ctx=SEQ, n_threads=2, verbose=False, logits_all=True,
                   type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


@pytest.mark.parametrize("method", GGUF_METHODS)
def test_gguf_logits_match_llama_cpp_past_the_original_context(tmp_path, method):
    require_llama3_tokenizer()
    scaling = {**METHODS[method], "original_max_position_embeddings": 16} if "yarn" in method else METHODS[method]
    make_hf_llama(tmp_path / "hf", vocab_size=LLAMA3_VOCAB, num_kv_heads=2, rope_theta=THETA,
                  rope_scaling=dict(scaling), max_position_embeddings=SEQ)
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(tmp_path / "ckpt"), str(out), "--tokenizer", str(llama3_tokenizer_dir()),
                 "--type", "f32"]) == 0
    tokens = list(np.random.default_rng(2).integers(0, 128_000, size=64))  # 4x the yarn arms' 16
    model = import_hf(tmp_path / "hf")
    ours = _ours(model, np.asarray([tokens]))[0]
    diff = np.abs(_llama_cpp_logits(out, tokens) - ours).max()
    plain = _ours(merge_params(model.config.replace(rope_scaling=None), _params(model)), np.asarray([tokens]))[0]
    assert np.abs(plain - ours).max() > MATTERS
    assert diff <= GGUF_LOGIT_TOL, diff


def test_gguf_refuses_what_llama_cpp_cannot_represent():
    cfg = ModelConfig(rope_scaling=RopeScaling(**METHODS["yarn-untruncated"]))
    with pytest.raises(UserError, match="truncate=false.*llama.cpp always rounds"):
        add_rope_scaling(None, cfg)  # refused before anything is written


# Bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,named", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}}, "low_freq_factor is missing"),
    ({"rope_theta": "500000"}, "rope_theta='500000' must be a number"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0.0}}, "factor=0.0 must be > 0"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "low_freq_factor": 1.0}},
     "low_freq_factor=1.0 is not a field of rope_type 'yarn'"),
    ({"rope_scaling": "yarn"}, "rope_scaling='yarn' must be a mapping"),
])
def test_malformed_hf_rope_config_is_one_error_line(tmp_path, capsys, change, named):
    make_hf_llama(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(change)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    err = cli_error(capsys, ["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")])
    assert err.startswith("lwm-jax: error:") and named in err, err


@pytest.mark.parametrize("override,named", [
    ("stages.1M.rope.type=ntk", "rope_type='ntk' is not supported"),
    ("stages.1M.rope.factor=0", "rope factor=0.0 must be > 0"),
    ("stages.1M.rope.factor=-2", "rope factor=-2.0 must be > 0"),
    ("stages.1M.rope={type: yarn, factor: 4}", "original_max_position_embeddings is missing"),
    ("stages.1M.rope.factor=big", "rope.factor='big' must be a number"),
    ("stages.1M.sweep=original_max_position_embeddings", "sweep='original_max_position_embeddings' must be"),
])
def test_bad_stage_rope_is_one_error_line(capsys, override, named):
    err = cli_error(capsys, ["plan", str(ROOT / "configs" / "recipes" / "ultralong_1m.yaml"), "--set", override])
    assert named in err, err


# Stages, recipes, sweeps ------------------------------------------------------------------------


def test_published_recipes_plan_with_their_rope(capsys):
    ultra = schedule_recipe(load_recipe(ROOT / "configs" / "recipes" / "ultralong_1m.yaml"), None, check_sources=False)
    rope = ultra[0].model.rope_scaling
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 128.0, 8192)
    assert ultra[0].model.rope_theta == 500_000 and ultra[0].stage.seq_len == 128 * 8192
    prolong = schedule_recipe(load_recipe(ROOT / "configs" / "recipes" / "prolong_512k.yaml"), None,
                              check_sources=False)
    assert [p.model.rope_theta for p in prolong] == [8e6, 128e6]
    assert all(p.model.rope_scaling is None for p in prolong)
    for name in ("ultralong_1m", "prolong_512k"):
        assert main(["plan", str(ROOT / "configs" / "recipes" / f"{name}.yaml"), "--hardware", "H100"]) == 0


def _recipe(stages):
    model = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
             "num_kv_heads": 1, "head_dim": 16, "bos_token_id": 0, "eos_token_id": [1], "max_position_embeddings": 64}
    return from_dict(RecipeConfig, {"name": "r", "model": model, "mesh": {"dp": 1}, "stages": stages})


def test_stage_rope_is_inherited_replaced_and_swept():
    yarn = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64}
    recipe = _recipe([
        {"name": "a", "seq_len": 256, "steps": 1, "rope_theta": 10000, "rope": yarn, "init_from": "ckpt:x",
         "sweep": "factor"},
        {"name": "b", "seq_len": 512, "steps": 1, "rope_theta": 10000},
        {"name": "c", "seq_len": 512, "steps": 1, "rope_theta": 10000, "rope": {"type": "default"}}])
    pending = schedule_recipe(recipe, 1, check_sources=False)
    assert pending[0].theta_pending and pending[0].model.rope_scaling.factor == 4.0
    assert pending[0].model.rope_scaling.rope_type == "yarn"  # `type` is transformers' older spelling
    plans = schedule_recipe(recipe, 1, check_sources=False, swept={"a": 6.5})
    assert not plans[0].theta_pending
    assert [p.model.rope_scaling and p.model.rope_scaling.factor for p in plans] == [6.5, 6.5, None]
    assert plans[1].model.to_hf()["rope_scaling"] == {"rope_type": "yarn", "factor": 6.5,
                                                      "original_max_position_embeddings": 64}
    with pytest.raises(UserError, match="both ask for a search"):
        StageConfig(name="x", seq_len=8, steps=1, rope_theta="sweep", rope=RopeScaling(**METHODS["yarn"]),
                    sweep="factor")


def test_factor_sweep_measures_each_candidate(tmp_path):
    make_hf_llama(tmp_path, rope_theta=THETA, rope_scaling=dict(METHODS["yarn"]), max_position_embeddings=SEQ)
    model = import_hf(tmp_path)
    tokens = _tokens(2)
    result = theta_sweep(model, tokens, context=SEQ, num=3, span=2.0, param="factor")
    assert result["param"] == "factor" and result["center_value"] == 4.0
    assert [p["value"] for p in result["points"]] == pytest.approx([2.0, 4.0, 8.0])
    for point in result["points"]:
        nll, _ = mean_nll(merge_params(with_value(model.config, "factor", point["value"]), _params(model)), tokens)
        assert point["mean_nll"] == pytest.approx(nll, rel=1e-6)
    assert result["best_nll"] == min(p["mean_nll"] for p in result["points"])
    assert len({round(p["mean_nll"], 6) for p in result["points"]}) == 3  # the factor changes the loss


def test_mini_extension_yarn_arm_has_the_other_arms_data_and_steps(tmp_path):
    if "mini_extension" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mini_extension", ROOT / "scripts" / "mini_extension.py")
        sys.modules["mini_extension"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["mini_extension"])
    script = sys.modules["mini_extension"]
    s = script.PRESETS["quick"]
    arms = {name: script.arm_stages(s, rule, tmp_path / "base") for name, rule in script.ARMS.items()}
    assert "yarn" in arms
    shape = lambda st: [(x["seq_len"], x["steps"], x["batch_size"], x["optimizer"]) for x in st]
    assert all(shape(stages) == shape(arms["control"]) for stages in arms.values())
    ropes = [st.get("rope") for st in arms["yarn"]]
    assert [r["factor"] for r in ropes] == [m for m, *_ in s.extension]
    assert all(r["type"] == "yarn" and r["original_max_position_embeddings"] == s.l0 for r in ropes)
    assert all(st["rope_theta"] == str(s.base_theta) for st in arms["yarn"])


def test_length_temperature_is_log_n_past_the_trained_length():
    assert length_temperature(64, 128) == length_temperature(128, 128) == 1.0
    assert length_temperature(512, 128) ** 2 == pytest.approx(9 / 7, rel=1e-12)  # ln 512 / ln 128
    assert length_temperature(2048, 512) ** 2 == pytest.approx(11 / 9, rel=1e-12)
    with pytest.raises(UserError):
        length_temperature(512, 1)


@pytest.mark.parametrize("method", [None, "yarn-mscale", "linear"])
def test_attention_temperature_scales_the_logits_as_scaled_queries_do(tmp_path, method):
    """cos/sin times s is q.k times s^2: the same model with q_proj times s^2 is the oracle (RoPE
    is linear in q, Llama has no q/k norm); only YaRN or no scaling can carry it."""
    scaling = dict(METHODS[method]) if method else None
    make_hf_llama(tmp_path, rope_theta=THETA, rope_scaling=scaling, max_position_embeddings=SEQ)
    model = import_hf(tmp_path)
    scale = 1.2
    if method == "linear":
        with pytest.raises(UserError, match="rope_type 'linear'"):
            with_attention_temperature(model.config, scale)
        return
    config = with_attention_temperature(model.config, scale)
    np.testing.assert_array_equal(model_inv_frequencies(config), model_inv_frequencies(model.config))
    assert model_rope_scale(config) == pytest.approx(scale * model_rope_scale(model.config), rel=1e-12)
    params = _params(model)
    tokens = _tokens()
    tempered = _ours(merge_params(config, params), tokens)
    params["layers"]["self_attn"]["q_proj"] = params["layers"]["self_attn"]["q_proj"] * scale**2
    oracle = _ours(merge_params(model.config, params), tokens)
    assert np.abs(tempered - oracle).max() <= LOGIT_TOL
    assert np.abs(tempered - _ours(model, tokens)).max() > MATTERS
    assert with_attention_temperature(model.config, 1.0) == model.config


def test_length_tempered_logits_pick_each_length_its_temperature(tmp_path):
    make_hf_llama(tmp_path, rope_theta=THETA, max_position_embeddings=ORIG)
    model = import_hf(tmp_path)
    fn = LengthTempered(model, [ORIG, SEQ], max_length=SEQ)
    ids = _tokens(1)[0]
    plain = ModelLogits(model, max_length=SEQ)
    np.testing.assert_array_equal(fn(ids[:ORIG]), plain(ids[:ORIG]))  # within the trained length: as is
    tempered = ModelLogits(merge_params(with_attention_temperature(model.config, length_temperature(SEQ, ORIG)),
                                        _params(model)), max_length=SEQ)
    np.testing.assert_array_equal(fn(ids), tempered(ids))
    assert np.abs(fn(ids) - plain(ids)).max() > MATTERS
