"""HF -> import-hf -> export-hf -> transformers round trips, and clear errors on bad checkpoints."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lwm_jax.cli import main
from lwm_jax.config import MeshConfig
from lwm_jax.convert.hf import export_hf_checkpoint, import_hf, import_hf_checkpoint
from lwm_jax.generate import generate_command
from lwm_jax.model.opened import open_checkpoint
from lwm_jax.model.store import read_metadata
from lwm_jax.parallel.mesh import make_mesh
from tests.conftest import cli_error, llama3_tokenizer_dir

LOGIT_TOL = 1e-4


def _tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(safetensors.numpy.load_file(path))
    return out


def _logits(folder, tokens, dtype=torch.float32):
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy(), model


@pytest.mark.parametrize("tie,shard", [(False, "1GB"), (True, "40KB")], ids=["untied-single", "tied-sharded"])
def test_round_trip_is_bit_identical(tmp_path, hf_llama, tie, shard):
    hf_dir, hf_model = hf_llama(tie=tie, num_kv_heads=2, rope_theta=3.58e9)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert main(["import-hf", str(hf_dir), str(ckpt)]) == 0
    assert main(["export-hf", str(ckpt), str(out), "--dtype", "float32", "--max-shard-size", shard,
                 "--tokenizer", str(llama3_tokenizer_dir())]) == 0
    original, exported = _tensors(hf_dir), _tensors(out)
    assert set(exported) == set(original) - ({"lm_head.weight"} if tie else set())
    for name, value in original.items():
        if name in exported:
            assert exported[name].dtype == np.float32
            assert np.array_equal(exported[name], value), name
    assert (out / "model.safetensors.index.json").is_file() == (shard == "40KB")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 3.58e9 and config["max_position_embeddings"] == 8192
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 1
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()

    tokens = np.random.default_rng(0).integers(0, 256, size=(1, 64))
    theirs, reloaded = _logits(out, tokens)
    assert reloaded.config.tie_word_embeddings == tie
    with torch.no_grad():
        expected = hf_model(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(theirs - expected).max() <= LOGIT_TOL

    # A sharded export imports again (index json path).
    assert main(["import-hf", str(out), str(tmp_path / "ckpt2")]) == 0


def test_import_onto_a_mesh_gives_the_same_logits(hf_llama):
    hf_dir, _ = hf_llama(num_kv_heads=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(2, 32)))
    mesh = make_mesh(MeshConfig(fsdp=4, tp=2))
    sharded = import_hf(hf_dir, mesh=mesh)
    assert len(sharded.layers.mlp.up_proj.get_value().sharding.device_set) == 8
    single = np.asarray(import_hf(hf_dir)(tokens))
    assert np.abs(np.asarray(sharded(tokens)) - single).max() <= LOGIT_TOL


def test_bfloat16_export_loads_in_transformers(tmp_path, hf_llama):
    hf_dir, hf_model = hf_llama()
    assert main(["import-hf", str(hf_dir), str(tmp_path / "c")]) == 0
    assert main(["export-hf", str(tmp_path / "c"), str(tmp_path / "o")]) == 0
    assert all(t.dtype.name == "bfloat16" for t in _tensors(tmp_path / "o").values())
    tokens = np.arange(32)[None]
    theirs, _ = _logits(tmp_path / "o", tokens, dtype=torch.float32)
    with torch.no_grad():
        expected = hf_model(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(theirs - expected).max() <= 0.05 * np.abs(expected).max()


def test_eval_ppl_matches_transformers(tmp_path, hf_llama, capsys):
    hf_dir, hf_model = hf_llama(num_kv_heads=2)
    tokens = np.random.default_rng(3).integers(0, 256, size=(2, 64))
    np.save(tmp_path / "t.npy", tokens)
    assert main(["import-hf", str(hf_dir), str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert main(["eval", "ppl", str(tmp_path / "c"), "--tokens", str(tmp_path / "t.npy"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with torch.no_grad():
        out = hf_model(torch.as_tensor(tokens), labels=torch.as_tensor(tokens))
    assert result["tokens"] == 2 * 63
    assert abs(result["mean_nll"] - float(out.loss)) <= 1e-5


# Bad input ---------------------------------------------------------------------------------------


def test_missing_config(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    assert "no config.json" in cli_error(capsys, ["import-hf", str(tmp_path / "hf"), str(tmp_path / "c")])


def test_unsupported_architecture(tmp_path, hf_llama, capsys):
    hf_dir, _ = hf_llama()
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096)
    (hf_dir / "config.json").write_text(json.dumps(config))
    err = cli_error(capsys, ["import-hf", str(hf_dir), str(tmp_path / "c")])
    assert "MistralForCausalLM" in err and "unsupported architecture" in err


def test_wrong_tensor_shape(tmp_path, hf_llama, capsys):
    hf_dir, _ = hf_llama()
    tensors = safetensors.numpy.load_file(hf_dir / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((100, 64), np.float32)
    safetensors.numpy.save_file(tensors, hf_dir / "model.safetensors")
    err = cli_error(capsys, ["import-hf", str(hf_dir), str(tmp_path / "c")])
    assert "model.layers.1.mlp.up_proj.weight" in err and "(100, 64)" in err and "(160, 64)" in err


def test_pickle_weights_refused(tmp_path, hf_llama, capsys):
    hf_dir, model = hf_llama()
    (hf_dir / "model.safetensors").unlink()
    torch.save(model.state_dict(), hf_dir / "pytorch_model.bin")
    err = cli_error(capsys, ["import-hf", str(hf_dir), str(tmp_path / "c")])
    assert "pytorch_model.bin" in err and "never unpickles" in err and "save_pretrained" in err


def test_token_id_out_of_vocab(tmp_path, hf_llama, capsys):
    hf_dir, _ = hf_llama()
    assert main(["import-hf", str(hf_dir), str(tmp_path / "c")]) == 0
    np.save(tmp_path / "t.npy", np.array([[1, 2, 256, 3]]))
    err = cli_error(capsys, ["eval", "ppl", str(tmp_path / "c"), "--tokens", str(tmp_path / "t.npy")])
    assert "256" in err and "vocab" in err


def test_existing_outputs_not_overwritten(tmp_path, hf_llama, capsys):
    hf_dir, _ = hf_llama()
    ckpt = tmp_path / "c"
    assert main(["import-hf", str(hf_dir), str(ckpt)]) == 0
    assert "already exists" in cli_error(capsys, ["import-hf", str(hf_dir), str(ckpt)])
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "not empty" in cli_error(capsys, ["export-hf", str(ckpt), str(out)])
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_checkpoint(tmp_path, capsys):
    np.save(tmp_path / "t.npy", np.array([[1, 2]]))
    assert "does not exist" in cli_error(capsys, ["eval", "ppl", str(tmp_path / "nope"), "--tokens",
                                               str(tmp_path / "t.npy")])


# Real-world Hugging Face folders ------------------------------------------------------------------

GEN_TOKENS = 12  # greedy continuation compared token for token with transformers


def _transformers_llama(out, *, dtype=None, vocab_size=256, hidden_size=64, num_heads=4, num_kv_heads=2,
                        intermediate_size=160, seed=0, **config):
    """Saves a random `transformers.LlamaForCausalLM` (any LlamaConfig fields in `config`) to `out`."""
    torch.manual_seed(seed)
    base = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=2, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                head_dim=hidden_size // num_heads, initializer_range=0.1, attn_implementation="eager")
    model = LlamaForCausalLM(LlamaConfig(**{**base, **config})).eval()
    with torch.no_grad():  # non-trivial norm weights so a swapped norm cannot pass
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out)
    return model


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _logits_match(hf_dir, ckpt, tokens, tol=LOGIT_TOL):
    ours = np.asarray(open_checkpoint(ckpt).model()(jnp.asarray(tokens)))
    theirs, _ = _logits(hf_dir, tokens)
    return np.abs(ours - theirs).max() <= tol


@pytest.mark.parametrize("how", ["null", "absent"])
def test_null_special_ids_stay_null_and_generation_matches(tmp_path, how):
    hf_dir = tmp_path / "hf"
    model = _transformers_llama(hf_dir, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if how == "absent":
        _edit_config(hf_dir, bos_token_id=..., eos_token_id=..., pad_token_id=...)
    assert json.loads((hf_dir / "config.json").read_text()).get("eos_token_id", "absent") in (None, "absent")
    import_hf_checkpoint(hf_dir, tmp_path / "c")
    stored = read_metadata(tmp_path / "c")["model"]
    assert (stored["bos_token_id"], stored["eos_token_id"], stored["pad_token_id"]) == (None, None, None)

    prompt = np.random.default_rng(1).integers(0, 256, size=9).astype(np.int32)
    np.save(tmp_path / "p.npy", prompt)
    ours = generate_command(tmp_path / "c", tokens=tmp_path / "p.npy", max_new_tokens=GEN_TOKENS)["new_tokens"]
    model.generation_config.eos_token_id = None  # "absent": transformers' LlamaConfig would default it to 2
    with torch.no_grad():
        ids = torch.as_tensor(prompt[None].astype(np.int64))
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GEN_TOKENS,
                                do_sample=False)[0, len(prompt):].tolist()
    assert ours == theirs and len(ours) == GEN_TOKENS

    export_hf_checkpoint(tmp_path / "c", tmp_path / "o")
    for name in ("config.json", "generation_config.json"):
        written = json.loads((tmp_path / "o" / name).read_text())
        assert [written[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")] == [None, None, None], name


@pytest.mark.parametrize("dtype,key,export", [(torch.bfloat16, "dtype", "bfloat16"),
                                              (torch.float16, "torch_dtype", "float16")], ids=["bf16", "fp16"])
def test_half_precision_weights_import_and_round_trip_bit_exact(tmp_path, dtype, key, export):
    hf_dir = tmp_path / "hf"
    _transformers_llama(hf_dir, dtype=dtype)
    config = json.loads((hf_dir / "config.json").read_text())
    written = config.pop("dtype", None) or config.pop("torch_dtype")
    _edit_config(hf_dir, **{"dtype": ..., "torch_dtype": ..., key: written})  # the spelling of the case only
    import_hf_checkpoint(hf_dir, tmp_path / "c")
    # Half-precision weights widen to float32 exactly on both sides, so float32 logits agree.
    assert _logits_match(hf_dir, tmp_path / "c", np.arange(40)[None])
    export_hf_checkpoint(tmp_path / "c", tmp_path / "o", dtype=export)
    original, exported = _tensors(hf_dir), _tensors(tmp_path / "o")
    assert set(original) == set(exported)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and exported[name].tobytes() == value.tobytes(), name


def test_extra_rotary_inv_freq_tensors_are_ignored(tmp_path):
    hf_dir = tmp_path / "hf"
    _transformers_llama(hf_dir)
    tensors = safetensors.numpy.load_file(hf_dir / "model.safetensors")
    for i in range(2):  # older transformers saved the RoPE buffer with the weights
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    safetensors.numpy.save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    import_hf_checkpoint(hf_dir, tmp_path / "c")
    assert _logits_match(hf_dir, tmp_path / "c", np.arange(32)[None])


def test_sharded_index_with_a_missing_shard(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    model = _transformers_llama(hf_dir)
    model.save_pretrained(hf_dir, max_shard_size="100KB")
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    (hf_dir / "model.safetensors").unlink(missing_ok=True)
    (hf_dir / shards[1]).unlink()
    err = cli_error(capsys, ["import-hf", str(hf_dir), str(tmp_path / "c")])
    assert shards[1] in err and "missing" in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("cut", [0.5, 0.999], ids=["half", "last-bytes"])
def test_truncated_safetensors_is_one_error_line(tmp_path, hf_llama, capsys, cut):
    hf_dir, _ = hf_llama()
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    err = cli_error(capsys, ["import-hf", str(hf_dir), str(tmp_path / "c")])
    assert str(path) in err and "truncated" in err


def test_export_files_are_world_readable(tmp_path, hf_llama):
    hf_dir, _ = hf_llama()
    import_hf_checkpoint(hf_dir, tmp_path / "c")
    old = os.umask(0o022)
    try:
        export_hf_checkpoint(tmp_path / "c", tmp_path / "o", tokenizer_dir=llama3_tokenizer_dir())
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "o").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


LLAMA3_IDS = dict(vocab_size=128_256, bos_token_id=128_000, eos_token_id=[128_001, 128_008, 128_009])
FAMILY = {
    # meta-llama/Llama-3.1-8B-Instruct's config.json, shapes shrunk.
    "3.1": dict(rope_theta=500_000.0, max_position_embeddings=131_072, tie_word_embeddings=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # meta-llama/Llama-3.2-1B-Instruct: tied embeddings (no lm_head tensor), RoPE factor 32.
    "3.2": dict(rope_theta=500_000.0, max_position_embeddings=131_072, tie_word_embeddings=True,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # meta-llama/Llama-3.3-70B-Instruct: bf16 weights, pretraining_tp, explicit head_dim.
    "3.3": dict(rope_theta=500_000.0, max_position_embeddings=131_072, tie_word_embeddings=False,
                pretraining_tp=1, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


@pytest.mark.parametrize("version", sorted(FAMILY))
def test_llama3_family_configs(tmp_path, version):
    hf_dir = tmp_path / "hf"
    dtype = torch.bfloat16 if version == "3.3" else None
    _transformers_llama(hf_dir, hidden_size=32, intermediate_size=64, dtype=dtype, **LLAMA3_IDS, **FAMILY[version])
    import_hf_checkpoint(hf_dir, tmp_path / "c")
    tokens = np.random.default_rng(2).integers(0, 128_256, size=(1, 48))
    assert _logits_match(hf_dir, tmp_path / "c", tokens)
    export_hf_checkpoint(tmp_path / "c", tmp_path / "o", dtype="float32")
    before, after = (json.loads((d / "config.json").read_text()) for d in (hf_dir, tmp_path / "o"))
    for key in ("bos_token_id", "eos_token_id", "tie_word_embeddings", "max_position_embeddings"):
        assert after[key] == before[key], key
    scaling = before.get("rope_scaling") or before["rope_parameters"]  # transformers 5 writes rope_parameters
    assert after["rope_theta"] == before.get("rope_theta", scaling.get("rope_theta"))
    assert after["rope_scaling"]["factor"] == scaling["factor"]
    assert ("lm_head.weight" in _tensors(tmp_path / "o")) == (version != "3.2")
