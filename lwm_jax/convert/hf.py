"""Hugging Face Llama checkpoints (safetensors + config.json) to and from lwm-jax params.

Import reads single-file or sharded safetensors (with `model.safetensors.index.json`), checks every
tensor's shape against `config.json`, and never unpickles `.bin` files. Export writes safetensors
(sharded past a size, with an index), `config.json` carrying the stage's `rope_theta` and
`max_position_embeddings`, `generation_config.json`, and optionally the tokenizer files. Between
files and checkpoints both directions stream: one stacked param leaf is in memory at a time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import yaml
from flax import nnx

from lwm_jax.config import ModelConfig
from lwm_jax.convert.safetensors_io import INDEX_FILE, TensorReader, plan_shards, weight_files, write_safetensors
from lwm_jax.errors import UserError
from lwm_jax.model.llama import Llama
from lwm_jax.model.opened import open_checkpoint
from lwm_jax.model.store import (
    LazyLeaf,
    check_new_checkpoint,
    model_metadata,
    params_target,
    read_hf_config,
    save_lazy_params,
)
from lwm_jax.outputs import check_output_dir, staged_folder
from lwm_jax.parallel.mesh import state_shardings
from lwm_jax.progress import Counter, progress

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
IGNORED_TENSORS = ("rotary_emb.inv_freq",)
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


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


def _open_hf(hf_dir: str | Path, **runtime) -> tuple[ModelConfig, Callable[[str], np.ndarray]]:
    """`(config, build)` of a Hugging Face folder: `build(dotted param key)` makes that stacked
    float32 param leaf from the HF tensors, holding one HF tensor (or a block of rows) beside it.
    Every file is opened and every shape checked here, before any leaf is built."""
    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir, **runtime)
    files = weight_files(hf_dir)
    read = TensorReader(files, _check_names(files, cfg))
    read.check_all()
    layer_map = _layer_map(cfg)

    def build(key: str) -> np.ndarray:
        if key.startswith("layers."):
            hf_name, to_ours, _ = layer_map[key.removeprefix("layers.")]
            out = None
            for i in range(cfg.num_layers):
                value = to_ours(read(f"model.layers.{i}.{hf_name}"))
                if out is None:
                    out = np.empty((cfg.num_layers, *value.shape), np.float32)
                out[i] = value
            return out
        if key == "norm.weight":
            return read("model.norm.weight")
        names = {"embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}
        if key not in names:
            raise AssertionError(f"no HF mapping for param {key}")
        transpose = key == "lm_head"  # ours [d, vocab], HF [vocab, d]
        shape = read.shapes[names[key]]
        out = np.empty(shape[::-1] if transpose else shape, np.float32)
        for start, stop, rows in read.blocks(names[key]):
            if transpose:
                out[:, start:stop] = rows.T
            else:
                out[start:stop] = rows
        return out

    return cfg, build


def import_hf(hf_dir: str | Path, mesh=None, **runtime) -> Llama:
    """Builds a `Llama` holding the weights of the Hugging Face model in `hf_dir`."""
    cfg, build = _open_hf(hf_dir, **runtime)
    abstract = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = None
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(state_shardings(mesh, params)))
    flat = nnx.to_flat_state(params)
    for path, variable in progress(list(flat), desc="import-hf"):
        sharding = shardings[path].get_value() if shardings is not None else None
        variable.set_value(jax.device_put(build(".".join(str(p) for p in path)), sharding))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def import_hf_checkpoint(hf_dir: str | Path, ckpt: str | Path, *, mesh=None, force: bool = False) -> dict:
    """`lwm-jax import-hf`: writes the Hugging Face model in `hf_dir` as an orbax checkpoint at
    `ckpt`, one param leaf in memory at a time; returns `{"checkpoint", "params", "rope_theta"}`."""
    check_new_checkpoint(ckpt, force)
    cfg, build = _open_hf(hf_dir)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params_target(cfg, mesh))
    bar = Counter("import-hf", total=len(leaves))

    def make(key: str) -> np.ndarray:
        value = build(key)
        bar.update(1)
        return value

    lazy = [LazyLeaf(functools.partial(make, ".".join(str(k.key) for k in path)), leaf.shape, leaf.dtype,
                     leaf.sharding) for path, leaf in leaves]
    try:
        path = save_lazy_params(ckpt, treedef.unflatten(lazy),
                                model_metadata(cfg, source=os.path.abspath(hf_dir)), overwrite=force)
    finally:
        bar.close()
    return {"checkpoint": str(path), "params": cfg.num_params, "rope_theta": cfg.rope_theta}


def import_hf_params(hf_dir: str | Path, mesh, runtime: dict) -> dict:
    """Params (pure dict) of a Hugging Face folder on `mesh` (the `TrainServices.load_hf` of training)."""
    return nnx.to_pure_dict(nnx.state(import_hf(hf_dir, mesh=mesh, **runtime)))


# Export ------------------------------------------------------------------------------------------


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


def _hf_names(cfg: ModelConfig, key: str) -> list[str]:
    """The HF tensors one of our param leaves (dotted key) becomes, in the order `_leaf_tensors` gives."""
    if key.startswith("layers."):
        hf_name = _layer_map(cfg)[key.removeprefix("layers.")][0]
        return [f"model.layers.{i}.{hf_name}" for i in range(cfg.num_layers)]
    return [{"embed_tokens": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head": "lm_head.weight"}[key]]


def _leaf_tensors(cfg: ModelConfig, leaves: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in HF layout) for each param leaf of `leaves`, leaf by leaf."""
    layer_map = _layer_map(cfg)
    for key, value in leaves:
        if key.startswith("layers."):
            to_hf = layer_map[key.removeprefix("layers.")][2]
            for name, i in zip(_hf_names(cfg, key), range(cfg.num_layers)):
                yield name, to_hf(value[i])
        else:
            yield _hf_names(cfg, key)[0], value.T if key == "lm_head" else value
        del value  # freed before the next leaf is read


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


def _check_export(out_dir: Path, dtype: str, tokenizer_dir, force: bool) -> Path | None:
    """The tokenizer folder (or None) once the export's arguments are known good; nothing is read yet."""
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise UserError(f"--tokenizer {tokenizer_dir} has no tokenizer.json")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} exists and is not empty; choose a new folder or pass --force")
    check_output_dir(out_dir, "output folder")
    return tokenizer_dir


def _write_hf(cfg: ModelConfig, leaves: Iterable[tuple[str, np.ndarray]], keys: list[str], out_dir: Path, *,
              dtype: str, tokenizer_dir: Path | None, max_shard_bytes: int) -> Path:
    """Writes the HF folder from `leaves` (dotted key, float32 leaf; in the order of `keys`) into the
    existing folder `out_dir`, one leaf in memory at a time: safetensors shards as a stream, then
    config, generation config, tokenizer."""
    np_dtype = EXPORT_DTYPES[dtype]
    shapes = hf_shapes(cfg)
    entries = [(name, shapes[name]) for key in keys for name in _hf_names(cfg, key)]
    shards = plan_shards(entries, np_dtype, max_shard_bytes)
    tensors = iter(progress(_leaf_tensors(cfg, leaves), desc="export-hf", total=len(entries)))
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", shards[0], np_dtype, tensors, meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out_dir / fname, shard, np_dtype, tensors, meta)
            weight_map.update({name: fname for name, _ in shard})
        total = sum(math.prod(shape) for _, shape in entries) * np.dtype(np_dtype).itemsize
        (out_dir / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf(torch_dtype=dtype), indent=2))
    generation = {**cfg.special_ids_hf(), "do_sample": True, "temperature": 0.6, "top_p": 0.9,
                  "max_length": cfg.max_position_embeddings}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            if (tokenizer_dir / fname).is_file():
                shutil.copyfile(tokenizer_dir / fname, out_dir / fname)  # mode from the umask, as the rest
    return out_dir


def _leaf_keys(cfg: ModelConfig) -> list[str]:
    """Dotted keys of the param leaves, in the order of a checkpoint's (pure dict) tree."""
    paths = jax.tree_util.tree_flatten_with_path(params_target(cfg, None))[0]
    return [".".join(str(k.key) for k in path) for path, _ in paths]


def export_hf(model: Llama, out_dir: str | Path, *, dtype: str = "bfloat16", max_position_embeddings: int | None = None,
              tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 5 * 10**9,
              force: bool = False) -> Path:
    """Writes `model` as a Hugging Face Llama folder; returns the folder."""
    out_dir = Path(out_dir)
    tokenizer_dir = _check_export(out_dir, dtype, tokenizer_dir, force)
    cfg = model.config
    if max_position_embeddings is not None:
        cfg = cfg.replace(max_position_embeddings=max_position_embeddings)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    keys = _leaf_keys(cfg)
    values = (np.asarray(jax.device_get(leaf), np.float32) for leaf in jax.tree.leaves(params))
    with staged_folder(out_dir) as stage:
        _write_hf(cfg, zip(keys, values), keys, stage, dtype=dtype, tokenizer_dir=tokenizer_dir,
                  max_shard_bytes=max_shard_bytes)
    return out_dir


def export_hf_checkpoint(ckpt: str | Path, out_dir: str | Path, *, stage: str | None = None, dtype: str = "bfloat16",
                         tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 5 * 10**9,
                         force: bool = False) -> dict:
    """`lwm-jax export-hf`: writes the latest step of checkpoint `ckpt` (with `stage`: `ckpt` is a
    train workdir, and a model card is added) as a Hugging Face folder, reading one param leaf at a
    time; returns `{"out_dir", "dtype"}`."""
    out_dir = Path(out_dir)
    ckpt, record = stage_checkpoint(ckpt, stage) if stage else (ckpt, None)
    tokenizer_dir = _check_export(out_dir, dtype, tokenizer_dir, force)
    opened = open_checkpoint(ckpt)
    cfg = opened.config
    # The leaf reader is closed here, also on failure: left to the garbage collector, it would close
    # its orbax manager at interpreter exit, after JAX's atexit hook shut the backends down; that
    # close starts them again, and a thread started during finalization never runs (a hang).
    with staged_folder(out_dir) as stage, contextlib.closing(opened.iter_params()) as leaves:
        _write_hf(cfg, leaves, _leaf_keys(cfg), stage, dtype=dtype, tokenizer_dir=tokenizer_dir,
                  max_shard_bytes=max_shard_bytes)
        if record is not None:
            write_model_card(stage, record, opened.metadata)
    return {"out_dir": str(out_dir), "dtype": dtype}


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
