"""HF -> import-hf -> export-hf -> transformers round trips, and clear errors on bad checkpoints."""

import json

import numpy as np
import pytest
import safetensors.numpy
import torch

from lwm_jax.cli import main
from tests.conftest import cli_error, llama3_tokenizer_dir

LOGIT_TOL = 1e-4


def _tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(safetensors.numpy.load_file(path))
    return out


def _logits(folder, tokens, dtype=torch.float32):
    from transformers import LlamaForCausalLM

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
    import jax.numpy as jnp

    from lwm_jax.config import MeshConfig
    from lwm_jax.convert.hf import import_hf
    from lwm_jax.parallel.mesh import make_mesh

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
