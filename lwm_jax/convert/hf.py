"""Hugging Face Llama checkpoints (safetensors + config.json) to and from lwm-jax params.

Import reads single-file or sharded safetensors (with `model.safetensors.index.json`), checks every
tensor's shape against `config.json`, and never unpickles `.bin` files. Export writes safetensors
(sharded past a size, with an index), `config.json` carrying the stage's `rope_theta` and
`max_position_embeddings`, `generation_config.json`, and optionally the tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
import yaml
from flax import nnx

from lwm_jax.config import ModelConfig
from lwm_jax.errors import UserError
from lwm_jax.model.llama import Llama
from lwm_jax.model.store import read_hf_config
from lwm_jax.parallel.mesh import state_shardings
from lwm_jax.progress import progress

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
IGNORED_TENSORS = ("rotary_emb.inv_freq",)
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
PICKLE_HINT = ("convert them to safetensors first, e.g. python -c \"from transformers import "
               "AutoModelForCausalLM as M; M.from_pretrained('IN').save_pretrained('OUT')\"")


def _layer_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    """Our stacked param path -> (HF name template, HF->ours, ours->HF) for one layer."""
    d, hd, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads

    def in_heads(h):  # HF [h*hd, d] <-> ours [d, h, hd]
        return (lambda w: w.T.reshape(d, h, hd), lambda p: p.reshape(d, h * hd).T)

    t = (lambda w: w.T, lambda p: p.T)
    same = (lambda w: w, lambda p: p)
    return {
        "self_attn.q_proj": ("self_attn.q_proj.weight", *in_heads(hq)),
        "self_attn.k_proj": ("self_attn.k_proj.weight", *in_heads(hkv)),
        "self_attn.v_proj": ("self_attn.v_proj.weight", *in_heads(hkv)),
        "self_attn.o_proj": ("self_attn.o_proj.weight",
                             lambda w: w.T.reshape(hq, hd, d), lambda p: p.reshape(hq * hd, d).T),
        "mlp.gate_proj": ("mlp.gate_proj.weight", *t),
        "mlp.up_proj": ("mlp.up_proj.weight", *t),
        "mlp.down_proj": ("mlp.down_proj.weight", *t),
        "input_layernorm.weight": ("input_layernorm.weight", *same),
        "post_attention_layernorm.weight": ("post_attention_layernorm.weight", *same),
    }


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name -> its expected shape for `cfg`."""
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    per_layer = {
        "self_attn.q_proj.weight": (cfg.num_heads * hd, d),
        "self_attn.k_proj.weight": (cfg.num_kv_heads * hd, d),
        "self_attn.v_proj.weight": (cfg.num_kv_heads * hd, d),
        "self_attn.o_proj.weight": (d, cfg.num_heads * hd),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
    }
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


# Import ------------------------------------------------------------------------------------------


def _weight_files(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: hf_dir / fname for name, fname in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise UserError(f"{index} names missing shard file(s): {', '.join(missing)}")
        return files
    single = sorted(hf_dir.glob("*.safetensors"))
    if not single:
        pickles = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt*"))
        if pickles:
            raise UserError(f"{hf_dir} holds only pickle weights ({', '.join(pickles)}); lwm-jax never "
                            f"unpickles files: {PICKLE_HINT}")
        raise UserError(f"{hf_dir} has no *.safetensors weights")
    files = {}
    for path in single:
        with safetensors.safe_open(path, framework="numpy") as f:
            files.update(dict.fromkeys(f.keys(), path))  # a safe_open handle has keys() but is not iterable
    return files


def _check_names(files: dict[str, Path], cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    expected = hf_shapes(cfg)
    names = {n for n in files if not n.endswith(IGNORED_TENSORS)}
    if cfg.tie_word_embeddings and "lm_head.weight" in names:
        names.discard("lm_head.weight")  # some tied checkpoints still store the copy
    missing = sorted(set(expected) - names)
    if missing:
        raise UserError(f"checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[0]}")
    extra = sorted(names - set(expected))
    if extra:
        raise UserError(f"checkpoint has {len(extra)} tensor(s) a Llama config does not define, e.g. {extra[0]}")
    return expected


class _Reader:
    """Reads HF tensors as float32 numpy, keeping each safetensors file open once."""

    def __init__(self, files: dict[str, Path], shapes: dict[str, tuple[int, ...]]):
        self.files, self.shapes, self.handles = files, shapes, {}

    def __call__(self, name: str) -> np.ndarray:
        path = self.files[name]
        if path not in self.handles:
            self.handles[path] = safetensors.safe_open(path, framework="numpy")
        tensor = self.handles[path].get_tensor(name)
        if tuple(tensor.shape) != self.shapes[name]:
            raise UserError(f"tensor {name} has shape {tuple(tensor.shape)} but the config expects "
                            f"{self.shapes[name]}")
        return np.asarray(tensor, dtype=np.float32)


def import_hf(hf_dir: str | Path, mesh=None, **runtime) -> Llama:
    """Builds a `Llama` holding the weights of the Hugging Face model in `hf_dir`."""
    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir, **runtime)
    files = _weight_files(hf_dir)
    read = _Reader(files, _check_names(files, cfg))
    abstract = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = None
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(state_shardings(mesh, params)))
    flat = nnx.to_flat_state(params)
    values = {}
    layer_map = _layer_map(cfg)
    for path, _ in progress(list(flat), desc="import-hf"):
        key = ".".join(str(p) for p in path)
        if key.startswith("layers."):
            hf_name, to_ours, _ = layer_map[key.removeprefix("layers.")]
            value = np.stack([to_ours(read(f"model.layers.{i}.{hf_name}")) for i in range(cfg.num_layers)])
        elif key == "embed_tokens":
            value = read("model.embed_tokens.weight")
        elif key == "norm.weight":
            value = read("model.norm.weight")
        elif key == "lm_head":
            value = read("lm_head.weight").T
        else:
            raise AssertionError(f"no HF mapping for param {key}")
        sharding = shardings[path].get_value() if shardings is not None else None
        values[path] = jax.device_put(np.ascontiguousarray(value), sharding)
    for path, variable in flat:
        variable.set_value(values[path])
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


# Export ------------------------------------------------------------------------------------------


def import_hf_params(hf_dir: str | Path, mesh, runtime: dict) -> dict:
    """Params (pure dict) of a Hugging Face folder on `mesh` (the `TrainHooks.load_hf` of training)."""
    return nnx.to_pure_dict(nnx.state(import_hf(hf_dir, mesh=mesh, **runtime)))


def hf_tensors(model: Llama) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, float32 numpy array) for every weight of `model`, in HF order."""
    cfg = model.config
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    by_key = {".".join(str(p) for p in path): v for path, v in params}

    def host(key):
        return np.asarray(jax.device_get(by_key[key].get_value()), np.float32)

    yield "model.embed_tokens.weight", host("embed_tokens")
    layer_map = _layer_map(cfg)
    stacked = {k: host("layers." + k) for k in layer_map}
    for i in range(cfg.num_layers):
        for key, (hf_name, _, to_hf) in layer_map.items():
            yield f"model.layers.{i}.{hf_name}", np.ascontiguousarray(to_hf(stacked[key][i]))
    yield "model.norm.weight", host("norm.weight")
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", np.ascontiguousarray(host("lm_head").T)


def parse_size(text: str) -> int:
    """Parses sizes like `5GB`, `200MB`, `1024` into bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, scale in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * scale)
    if upper.isdigit():
        return int(upper)
    raise UserError(f"bad size {text!r} (examples: 5GB, 500MB, 1048576)")


def export_hf(model: Llama, out_dir: str | Path, *, dtype: str = "bfloat16", max_position_embeddings: int | None = None,
              tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 5 * 10**9,
              force: bool = False) -> Path:
    """Writes `model` as a Hugging Face Llama folder; returns the folder."""
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
    out_dir = Path(out_dir)
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise UserError(f"--tokenizer {tokenizer_dir} has no tokenizer.json")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} exists and is not empty; choose a new folder or pass --force")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if max_position_embeddings is not None:
        cfg = cfg.replace(max_position_embeddings=max_position_embeddings)
    np_dtype = EXPORT_DTYPES[dtype]

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in progress(hf_tensors(model), desc="export-hf", total=len(hf_shapes(cfg))):
        value = value.astype(np_dtype)
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    total = sum(v.nbytes for shard in shards for v in shard.values())
    meta = {"format": "pt"}
    if len(shards) == 1:
        safetensors.numpy.save_file(shards[0], out_dir / "model.safetensors", metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            safetensors.numpy.save_file(shard, out_dir / fname, metadata=meta)
            weight_map.update({name: fname for name in shard})
        (out_dir / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf(torch_dtype=dtype), indent=2))
    eos = list(cfg.eos_token_id)
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
                  "do_sample": True, "temperature": 0.6, "top_p": 0.9,
                  "max_length": cfg.max_position_embeddings}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            if (tokenizer_dir / fname).is_file():
                shutil.copy2(tokenizer_dir / fname, out_dir / fname)
    return out_dir


def stage_checkpoint(workdir: str | Path, stage: str) -> tuple[Path, dict]:
    """(checkpoint folder, recipe record) of `stage` in a `lwm-jax train` workdir."""
    workdir = Path(workdir)
    recipe_file = workdir / "recipe.json"
    if not recipe_file.is_file():
        raise UserError(f"{workdir} is not a train workdir (no recipe.json); drop --stage to export a checkpoint")
    record = json.loads(recipe_file.read_text())
    names = [s["name"] for s in record["recipe"]["stages"]]
    if stage not in names:
        raise UserError(f"recipe {record['name']!r} has no stage {stage!r} (stages: {', '.join(names)})")
    ckpt = workdir / "stages" / stage / "checkpoints"
    if not ckpt.is_dir():
        raise UserError(f"stage {stage} of {workdir} has no checkpoints yet; train it first")
    return ckpt, record


def write_model_card(out_dir: Path, record: dict, metadata: dict) -> Path:
    """Writes README.md for an exported stage: its length, theta, training step and the recipe."""
    recipe = record["recipe"]
    stage = next(s for s in recipe["stages"] if s["name"] == metadata["stage"])
    shape = (f"seq_len {stage['seq_len']:,}, batch {stage['batch_size']} x grad_accum {stage['grad_accum']}, "
             f"{stage['steps']} steps")
    rows = "\n".join(f"| {s['name']} | {s['seq_len']:,} | {s['rope_theta']} | {s['batch_size']} | "
                      f"{s['grad_accum']} | {s['steps']} |" for s in recipe["stages"])
    text = f"""---
tags: [llama-3, long-context, lwm-jax]
---
# {record['name']} — stage {metadata['stage']}

Exported by lwm-jax from stage `{metadata['stage']}` of recipe `{record['name']}` at step {metadata.get('step')}.

- context length (`max_position_embeddings`): {metadata['max_position_embeddings']:,} tokens
- RoPE theta (`rope_theta`): {metadata['rope_theta']:,.0f}
- stage: {shape}
- recipe fingerprint: {record['fingerprint']}

## Stages of the recipe

| stage | seq_len | rope_theta | batch | grad_accum | steps |
|---|---|---|---|---|---|
{rows}

## Recipe

```yaml
{yaml.safe_dump(recipe, sort_keys=False)}```
"""
    path = out_dir / "README.md"
    path.write_text(text)
    return path
