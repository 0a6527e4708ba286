"""Config dataclasses: YAML loading, overrides, HF config.json both ways, and validation messages."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lwm_jax.config import MeshConfig, ModelConfig, apply_overrides, from_dict, load_model_config, load_recipe, to_dict
from lwm_jax.errors import UserError
from lwm_jax.model.llama import Llama
from tests.conftest import ROOT


def test_llama3_8b_yaml_has_the_seed_shapes():
    cfg = load_model_config(ROOT / "configs/models/llama3_8b.yaml")
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.vocab_size, cfg.rope_theta) == (32, 4096, 14336, 32, 8, 128, 128256, 500000.0)
    assert cfg.num_params == 8_030_261_248  # Meta-Llama-3-8B's published parameter count


def test_overrides_are_typed():
    cfg = load_model_config(ROOT / "configs/models/tiny.yaml", ["num_layers=2", "remat=none", "rope_theta=1e6"])
    assert (cfg.num_layers, cfg.remat, cfg.rope_theta) == (2, "none", 1e6)
    with pytest.raises(UserError, match="num_layers='two' must be an integer"):
        load_model_config(ROOT / "configs/models/tiny.yaml", ["num_layers=two"])
    with pytest.raises(UserError, match="unknown config key"):
        load_model_config(ROOT / "configs/models/tiny.yaml", ["num_layer=2"])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_hf_config_round_trip():
    cfg = load_model_config(ROOT / "configs/models/llama3_8b.yaml")
    back = ModelConfig.from_hf(cfg.to_hf(), dtype=cfg.dtype, attention=cfg.attention,
                               attention_block_size=cfg.attention_block_size)
    assert back == cfg
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


def test_transformers_5_rope_parameters_are_read():
    hf = ModelConfig().to_hf()
    del hf["rope_theta"], hf["rope_scaling"]
    hf["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling.factor == 8.0


@pytest.mark.parametrize("changes,message", [
    ({"num_heads": 6, "num_kv_heads": 4}, "num_heads=6 must be divisible by num_kv_heads=4"),
    ({"rope_theta": 0.0}, "rope_theta=0.0 must be a positive number"),
    ({"attention": "flash"}, "attention='flash' is not one of"),
    ({"attention_kernel": "triton"}, "attention_kernel='triton' is not one of"),
    ({"bos_token_id": 999_999}, "special token id 999999"),
])
def test_invalid_model_config(changes, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**changes)


def test_model_attention_kernel_reaches_the_kernel_choice():
    """The model's `attention_kernel` is what the attention call selects: a GPU-only kernel named
    on CPU is refused by the kernel registry, `xla` runs and equals `auto` (which is xla on CPU)."""
    base = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=16, attention="blockwise", attention_block_size=8,
                       bos_token_id=0, eos_token_id=(1,))
    tokens = jnp.arange(16, dtype=jnp.int32)[None] % 64
    logits = {}
    for kernel in ("auto", "xla"):
        logits[kernel] = Llama(base.replace(attention_kernel=kernel), nnx.Rngs(0))(tokens)
    assert jnp.array_equal(logits["auto"], logits["xla"])
    if jax.default_backend() == "cpu":
        with pytest.raises(UserError, match="kernel='cudnn' runs on gpu"):
            Llama(base.replace(attention_kernel="cudnn"), nnx.Rngs(0))(tokens)


def test_mesh_parse_and_resolve():
    assert MeshConfig.parse("dp=2,sp=4").shape == (2, 1, 4, 1, 1)  # (dp, fsdp, sp, ulysses, tp)
    assert MeshConfig.parse("dp=-1,sp=4").resolve(8).shape == (2, 1, 4, 1, 1)
    with pytest.raises(UserError, match="needs 8 devices but 4 are available"):
        MeshConfig.parse("dp=2,sp=4").resolve(4)
    with pytest.raises(UserError, match="bad mesh item"):
        MeshConfig.parse("xp=2")


def test_mesh_ulysses_axis_parses_and_defaults_to_one():
    mesh = MeshConfig.parse("ulysses=4,sp=2")
    assert (mesh.sp, mesh.ulysses, mesh.tp) == (2, 4, 1) and mesh.shape == (1, 1, 2, 4, 1)
    assert mesh.spec() == "dp=1,fsdp=1,sp=2,ulysses=4,tp=1" and MeshConfig.parse(mesh.spec()) == mesh
    assert MeshConfig.parse("dp=2,sp=4").spec() == "dp=2,fsdp=1,sp=4,tp=1"  # 4-axis specs read as before
    assert MeshConfig.parse("ulysses=-1,sp=2").resolve(8).ulysses == 4
    assert from_dict(MeshConfig, {"ulysses": 2, "sp": 4}) == MeshConfig(sp=4, ulysses=2)  # recipes
    with pytest.raises(UserError, match="mesh.ulysses=0 must be a positive integer"):
        MeshConfig(ulysses=0)


def test_recipe_overrides_reach_a_model_given_by_path():
    recipe = load_recipe(ROOT / "configs/recipes/gradient_1048k.yaml",
                         ["model.remat=none", "stages.65K.steps=3", "mesh.dp=2"])
    assert recipe.model.remat == "none" and recipe.model.num_layers == 32
    assert recipe.stage("65K").steps == 3 and recipe.mesh.dp == 2
    with pytest.raises(UserError, match="expected stages.<name>.<key>"):
        load_recipe(ROOT / "configs/recipes/gradient_1048k.yaml", ["stages.nope.steps=3"])


@pytest.mark.parametrize("name", ["a/..", "..", "../../tmp/x", "/abs", "-flag", "two words", ""])
def test_recipe_name_must_be_one_folder_name(tmp_path, name):
    """The name is the default run folder runs/NAME: a path in it would put the run elsewhere."""
    import yaml

    from lwm_jax.config import load_recipe

    raw = yaml.safe_load((ROOT / "configs/recipes/demo_cpu.yaml").read_text())
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**raw, "name": name}))
    with pytest.raises(UserError, match="must be a plain folder name"):
        load_recipe(path)
    path.write_text(yaml.safe_dump({**raw, "name": "demo_cpu-2.x"}))
    assert load_recipe(path).name == "demo_cpu-2.x"


@pytest.mark.parametrize("typo,meant", [("stagess", "stages"), ("modle", "model"), ("loss_chunck", "loss_chunk")])
def test_misspelt_top_level_recipe_key_is_named(tmp_path, typo, meant):
    import yaml

    from lwm_jax.config import load_recipe

    raw = yaml.safe_load((ROOT / "configs/recipes/demo_cpu.yaml").read_text())
    raw[typo] = raw.pop(meant)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=f"unknown recipe key '{typo}'; did you mean '{meant}'"):
        load_recipe(path)
