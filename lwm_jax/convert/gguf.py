"""GGUF export for llama.cpp: llama architecture metadata, the Llama-3 BPE tokenizer and the weights.

Weights come from `hf_tensors` (Hugging Face layout) and are renamed to llama.cpp's tensor names.
llama.cpp rotates adjacent pairs of a head's dims where HF rotates its two halves (`rotate_half`),
so q/k rows are reordered per head. The file is streamed tensor by tensor into a temporary file
that is renamed at the end, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from lwm_jax.config import ModelConfig, RopeScaling
from lwm_jax.convert.hf import hf_shapes, hf_tensors
from lwm_jax.data.tokenize import EOT_TOKEN
from lwm_jax.errors import UserError
from lwm_jax.model.llama import Llama
from lwm_jax.model.opened import open_checkpoint
from lwm_jax.model.rope import attention_factor, inv_frequencies
from lwm_jax.outputs import check_output_file, staged_file
from lwm_jax.progress import progress

QT = gguf.GGMLQuantizationType
GGUF_TYPES = ("f32", "f16", "q8_0")
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
MATRIX_TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0}
Q8_0_BLOCK = gguf.GGML_QUANT_SIZES[QT.Q8_0][0]  # values per Q8_0 block (32): a row must hold whole blocks
# llama.cpp's name for the Llama-3 pre-tokenizer (the regex below); it also sets ignore_merges.
LLAMA3_PRE = "llama-bpe"
LLAMA3_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DEFAULT_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A byte-level BPE tokenizer as GGUF stores it: one entry per id, merges, special ids."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos: int | None
    eos: int | None
    eot: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | list | None


@dataclasses.dataclass(frozen=True)
class _Planned:
    name: str  # llama.cpp tensor name
    shape: tuple[int, ...]  # numpy shape (ggml's `ne` reversed), as in HF
    qtype: gguf.GGMLQuantizationType


# Validation (cheap; runs before any weight is touched) -------------------------------------------


def check_type(type: str) -> None:
    if type not in GGUF_TYPES:
        raise UserError(f"--type {type!r} is not one of {', '.join(GGUF_TYPES)}")


def check_output(out_path: str | Path, force: bool) -> Path:
    """The absolute output path, refused if it is a folder, exists and `force` is off, or its
    folder cannot be written."""
    out = Path(out_path).absolute()
    if out.is_dir():
        raise UserError(f"{out} is a folder; give a file name such as {out / 'model.gguf'}")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; choose a new file or pass --force to overwrite it")
    return check_output_file(out, "output file")


def _special(config: dict, key: str, vocab: dict[str, int], where: Path) -> int | None:
    value = config.get(key, DEFAULT_SPECIALS.get(key))
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        return None
    if value not in vocab:
        raise UserError(f"{where}: {key} {value!r} is not a token of tokenizer.json")
    return vocab[value]


def _split_regex(pre_tokenizer: dict | None) -> str | None:
    """The regex of the first `Split` pre-tokenizer (inside a `Sequence` or alone), if any."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer or {}])
    for step in steps:
        if step.get("type") == "Split":
            return step.get("pattern", {}).get("Regex")
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None


def read_vocab(tokenizer_dir: str | Path, vocab_size: int) -> Vocab:
    """Reads a Hugging Face Llama-3 tokenizer folder; refuses one that does not fit `vocab_size`."""
    folder = Path(tokenizer_dir)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"--tokenizer {folder} has no tokenizer.json (expected a Hugging Face tokenizer folder)")
    spec = _read_json(path)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{path} holds a {model.get('type')!r} tokenizer; GGUF export supports the "
                        "Llama-3 byte-level BPE tokenizer only")
    regex = _split_regex(spec.get("pre_tokenizer"))
    if regex != LLAMA3_SPLIT_REGEX:
        raise UserError(f"{path} does not use the Llama-3 pre-tokenizer (its split regex is {regex!r}); "
                        "GGUF export supports Llama-3 tokenizers only")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    vocab.update({t["content"]: i for i, t in added.items()})
    n_tokens = max(vocab.values()) + 1
    if n_tokens != vocab_size:
        raise UserError(f"--tokenizer {folder} has {n_tokens:,} tokens but the model's vocab_size is "
                        f"{vocab_size:,}; use the tokenizer the checkpoint was trained with")

    tokens = [f"[PAD{i}]" for i in range(n_tokens)]
    types = [int(gguf.TokenType.UNUSED)] * n_tokens
    for text, i in vocab.items():
        tokens[i] = text
        if i in added:
            types[i] = int(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types[i] = int(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    return Vocab(tokens=tokens, types=types, merges=merges,
                 bos=_special(config, "bos_token", vocab, config_path),
                 eos=_special(config, "eos_token", vocab, config_path),
                 eot=vocab.get(EOT_TOKEN), pad=_special(config, "pad_token", vocab, config_path),
                 # Llama-3 is trained with BOS; llama.cpp's llama-bpe default is the same.
                 add_bos=bool(config.get("add_bos_token", True)),
                 add_eos=bool(config.get("add_eos_token", False)),
                 chat_template=config.get("chat_template"))


# Layout ------------------------------------------------------------------------------------------


def rope_rows_to_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """q/k weight `[heads * head_dim, d]` with each head's rows reordered from HF's halves
    `(x_0..x_{h/2-1}, x_{h/2}..x_{h-1})` to llama.cpp's rotated pairs `(x_0, x_{h/2}, x_1, ...)`."""
    rows, d = w.shape
    head_dim = rows // heads
    return w.reshape(heads, 2, head_dim // 2, d).transpose(0, 2, 1, 3).reshape(rows, d)


def rope_freq_factors(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """llama.cpp's `rope_freqs` `[head_dim // 2]`: the divisor of each base frequency under `llama3` scaling."""
    base = inv_frequencies(head_dim, theta)
    return (base / inv_frequencies(head_dim, theta, scaling)).astype(np.float32)


def _llama3(cfg: ModelConfig) -> bool:
    return cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3"


def add_rope_scaling(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    """llama.cpp's rope-scaling metadata for `cfg.rope_scaling`, or a UserError naming what it cannot
    represent. `llama3` travels as the `rope_freqs` tensor (as llama.cpp's own converter writes it);
    `linear` and `yarn` as `rope.scaling.*` keys. llama.cpp's YaRN always rounds the ramp's ends
    outward (transformers' `truncate: true`) and multiplies cos/sin by `rope.scaling.attn_factor *
    (1 + 0.1 ln factor)`, so transformers' attention factor is written as that quotient."""
    scaling = cfg.rope_scaling
    if scaling is None or scaling.rope_type in ("default", "llama3"):
        return
    if scaling.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling.factor)
        return
    if scaling.truncate is False:
        raise UserError("rope_scaling yarn with truncate=false cannot be exported to GGUF: llama.cpp always "
                        "rounds YaRN's correction range to whole dimensions (truncate=true)")
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(scaling.factor)
    writer.add_rope_scaling_orig_ctx_len(scaling.original_max_position_embeddings)
    writer.add_rope_scaling_yarn_beta_fast(scaling.beta_fast or 32.0)
    writer.add_rope_scaling_yarn_beta_slow(scaling.beta_slow or 1.0)
    writer.add_rope_scaling_attn_factors(attention_factor(scaling) / (1.0 + 0.1 * np.log(scaling.factor)))


def _plan(cfg: ModelConfig, type: str) -> list[_Planned]:
    """Every tensor of the file in write order: generated ones first, then `hf_tensors`' order.

    With q8_0, a matrix whose rows are not whole 32-value blocks stays F16, as llama.cpp's
    quantizer does ("falling back to F16 due to unusual shape"); `q8_0_fallbacks` names them.
    """
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_layers)
    shapes = hf_shapes(cfg)
    order = {"model.embed_tokens.weight": 0, "model.norm.weight": 2, "lm_head.weight": 3}
    plan = [_Planned(ROPE_FREQS, (cfg.head_dim // 2,), QT.F32)] if _llama3(cfg) else []
    for hf_name in sorted(shapes, key=lambda n: order.get(n, 1)):  # stable: layers keep their order
        shape = shapes[hf_name]
        qtype = QT.F32 if len(shape) == 1 else MATRIX_TYPES[type]
        if qtype == QT.Q8_0 and shape[-1] % Q8_0_BLOCK:
            qtype = QT.F16
        plan.append(_Planned(names.get_name(hf_name, try_suffixes=(".weight",)), shape, qtype))
    return plan


def q8_0_fallbacks(plan: list[_Planned], type: str) -> dict[str, int]:
    """The matrices of a q8_0 plan that stay F16: llama.cpp name pattern (layers as `blk.*`) -> row length."""
    if type != "q8_0":
        return {}
    return {re.sub(r"^blk\.\d+\.", "blk.*.", t.name): t.shape[-1] for t in plan
            if len(t.shape) > 1 and t.qtype == QT.F16}


def check_quantizable(cfg: ModelConfig, type: str) -> None:
    """Refuses q8_0 for a model none of whose matrices has rows of whole 32-value blocks: the file
    would hold no Q8_0 tensor while its `general.file_type` says Q8_0."""
    if type == "q8_0" and not any(t.qtype == QT.Q8_0 for t in _plan(cfg, type)):
        rows = sorted({t.shape[-1] for t in _plan(cfg, type) if len(t.shape) > 1})
        raise UserError(f"--type q8_0: no matrix of this model can be Q8_0 (their rows hold "
                        f"{', '.join(map(str, rows))} values, not whole {Q8_0_BLOCK}-value blocks); use --type f16")


def _llama_cpp_tensors(model: Llama, theta: float) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (llama.cpp name, float32 array in llama.cpp's layout) for every tensor of the file."""
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_layers)
    if _llama3(cfg):
        yield ROPE_FREQS, rope_freq_factors(cfg.head_dim, theta, cfg.rope_scaling)
    for hf_name, value in hf_tensors(model):
        if hf_name.endswith("self_attn.q_proj.weight"):
            value = rope_rows_to_llama_cpp(value, cfg.num_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            value = rope_rows_to_llama_cpp(value, cfg.num_kv_heads)
        yield names.get_name(hf_name, try_suffixes=(".weight",)), value


# Writing -----------------------------------------------------------------------------------------


def _add_metadata(writer: gguf.GGUFWriter, cfg: ModelConfig, vocab: Vocab, *, name: str, type: str,
                  context_length: int, rope_theta: float) -> None:
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(context_length)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(rope_theta)
    add_rope_scaling(writer, cfg)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)

    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(LLAMA3_PRE)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for token_id, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id),
                          (vocab.eot, writer.add_eot_token_id), (vocab.pad, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _write(model: Llama, out: Path, vocab: Vocab, *, type: str, context_length: int, rope_theta: float,
           name: str) -> dict:
    cfg = model.config
    plan = _plan(cfg, type)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_metadata(writer, cfg, vocab, name=name, type=type, context_length=context_length, rope_theta=rope_theta)
    total = 0
    for t in plan:
        block, block_bytes = gguf.GGML_QUANT_SIZES[t.qtype]
        nbytes = int(np.prod(t.shape)) // block * block_bytes
        if t.qtype == QT.Q8_0:  # quantized data is uint8 rows of blocks
            writer.add_tensor_info(t.name, gguf.quant_shape_to_byte_shape(t.shape, t.qtype), np.dtype(np.uint8),
                                   nbytes, raw_dtype=t.qtype)
        else:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32 if t.qtype == QT.F32 else np.float16),
                                   nbytes, raw_dtype=t.qtype)
        total += nbytes

    with staged_file(out) as partial:
        try:
            _write_tensors(writer, partial, plan, _llama_cpp_tensors(model, rope_theta), type)
        finally:
            with contextlib.suppress(OSError):  # after a failed write its flush fails again
                writer.close()
    return {"path": str(out), "type": type, "tensors": len(plan), "tensor_bytes": total,
            "file_bytes": out.stat().st_size, "context_length": context_length, "rope_theta": rope_theta,
            "vocab_size": cfg.vocab_size, "f16_fallbacks": q8_0_fallbacks(plan, type)}


def _write_tensors(writer: gguf.GGUFWriter, path: Path, plan: list[_Planned], source, type: str) -> None:
    """Writes the header, metadata and every planned tensor (taken from `source` in plan order) to `path`."""
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    pending = {}
    for t in progress(plan, desc=f"export-gguf {type}"):
        while t.name not in pending:  # tensors arrive in plan order, so this holds at most one
            tensor_name, value = next(source, (None, None))
            if tensor_name is None:
                raise AssertionError(f"the model yielded no tensor {t.name}")
            pending[tensor_name] = value
        value = pending.pop(t.name)
        if value.shape != t.shape:
            raise AssertionError(f"{t.name}: shape {value.shape} but planned {t.shape}")
        writer.write_tensor_data(gguf.quants.quantize(value, t.qtype))
    writer.close()


def export_gguf(model: Llama, out_path: str | Path, tokenizer_dir: str | Path, *, type: str = "f16",
                context_length: int | None = None, rope_theta: float | None = None, name: str | None = None,
                force: bool = False) -> dict:
    """Writes `model` with its tokenizer as a llama.cpp GGUF file; returns a summary (path, sizes, ...).

    `context_length` and `rope_theta` default to the model config's (pass a checkpoint's
    `max_position_embeddings` and `rope_theta` metadata for a trained stage).
    """
    check_type(type)
    check_quantizable(model.config, type)
    out = check_output(out_path, force)
    vocab = read_vocab(tokenizer_dir, model.config.vocab_size)
    return _write(model, out, vocab, type=type, name=name or out.stem,
                  context_length=context_length or model.config.max_position_embeddings,
                  rope_theta=rope_theta or model.config.rope_theta)


def export_checkpoint(ckpt: str | Path, out_path: str | Path, tokenizer_dir: str | Path, *, type: str = "f16",
                      step: int | None = None, force: bool = False) -> dict:
    """Exports a checkpoint step (latest by default) to GGUF, with its context length and theta.

    Every input is checked (type, output path, tokenizer against the checkpoint's vocab) before
    the weights are loaded.
    """
    check_type(type)
    out = check_output(out_path, force)
    opened = open_checkpoint(ckpt, step=step)
    check_quantizable(opened.config, type)
    vocab = read_vocab(tokenizer_dir, opened.config.vocab_size)
    return _write(opened.model(), out, vocab, type=type, name=out.stem, context_length=opened.trained_length,
                  rope_theta=opened.rope_theta)
