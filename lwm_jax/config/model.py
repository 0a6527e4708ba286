"""The model and mesh configs: Llama-3 shapes and RoPE, how the model runs, the mesh axes.

Every field is validated in `__post_init__`, so a bad config fails with a message naming the field
before any JAX work starts. `ModelConfig` also converts to and from a Hugging Face `config.json`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from lwm_jax.config.schema import apply_overrides, check, from_dict, load_yaml
from lwm_jax.errors import UserError

ATTENTION_IMPLS = ("reference", "blockwise", "ring")
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash", "pallas")  # per-block kernels of blockwise and ring
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")
EMBED_LOOKUPS = ("sharded", "gathered")
DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("dp", "fsdp", "sp", "ulysses", "tp")  # ulysses inner (inside a node), the ring across
# Fields that say how a model runs, not what it computes: a checkpoint loads, and a training run
# resumes, with any of them changed.
RUN_FIELDS = ("dtype", "scan_layers", "remat", "attention", "attention_block_size", "attention_kernel", "seq_tile",
              "embed_lookup")


ROPE_TYPES = ("default", "linear", "yarn", "llama3")
# The fields each RoPE type reads, as transformers' `modeling_rope_utils` defines them
# (`_validate_<type>_rope_parameters`): (required, optional).
ROPE_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "llama3": (("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"), ()),
}
# The real-valued fields: the ones a stage can sweep (`StageConfig.sweep`).
ROPE_SCALARS = ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling method with transformers' fields and meaning (`rope_scaling` in 4.x,
    `rope_parameters` in 5.x, less `rope_theta`): `linear` divides every inverse frequency by
    `factor`; `yarn` interpolates the low frequencies by `factor`, keeps the high ones, ramps
    between them (`beta_fast`/`beta_slow` rotations within `original_max_position_embeddings`) and
    scales cos/sin by the attention factor; `llama3` (Llama-3.1) divides by `factor` the
    frequencies whose wavelength exceeds `original_max_position_embeddings / low_freq_factor`,
    keeps those below `... / high_freq_factor` and interpolates the band between. The formulas are
    in `lwm_jax.model.rope`; a field a type does not read must stay unset (None)."""

    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    rope_type: str | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    type: str | None = None  # transformers' older spelling of rope_type, accepted and folded into it

    def __post_init__(self):
        if self.type is not None:
            check(self.rope_type in (None, self.type),
                  f"rope type={self.type!r} and rope_type={self.rope_type!r} disagree (give one)")
            object.__setattr__(self, "rope_type", self.type)
            object.__setattr__(self, "type", None)
        check(self.rope_type is not None, f"rope type is missing (rope_type: one of {', '.join(ROPE_TYPES)})")
        check(self.rope_type in ROPE_TYPES,
              f"rope_type={self.rope_type!r} is not supported (valid: {', '.join(ROPE_TYPES)})")
        required, optional = ROPE_FIELDS[self.rope_type]
        for name in required:
            check(getattr(self, name) is not None, f"rope {name} is missing: rope_type {self.rope_type!r} needs "
                  f"{', '.join(required)}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("rope_type", "type") or value is None:
                continue
            check(field.name in required + optional,
                  f"rope {field.name}={value!r} is not a field of rope_type {self.rope_type!r} "
                  f"(its fields: {', '.join(required + optional) or 'none'})")
            if field.name in ROPE_SCALARS:
                check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                      f"rope {field.name}={value!r} must be a number")
        for name in ("factor", "low_freq_factor", "attention_factor"):
            value = getattr(self, name)
            check(value is None or value > 0, f"rope {name}={value} must be > 0")
        orig = self.original_max_position_embeddings
        check(orig is None or (isinstance(orig, int) and not isinstance(orig, bool) and orig > 0),
              f"rope original_max_position_embeddings={orig!r} must be a positive integer")
        check(self.truncate is None or isinstance(self.truncate, bool),
              f"rope truncate={self.truncate!r} must be true or false")
        if self.rope_type == "llama3":
            check(self.high_freq_factor > self.low_freq_factor,
                  f"rope high_freq_factor={self.high_freq_factor} must exceed low_freq_factor={self.low_freq_factor}")

    def to_hf(self) -> dict[str, Any]:
        """The `rope_scaling` dict of a Hugging Face config.json (the fields that are set)."""
        names = [f.name for f in dataclasses.fields(self) if f.name not in ("rope_type", "type")]
        return {"rope_type": self.rope_type, **{k: getattr(self, k) for k in names if getattr(self, k) is not None}}


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """`(rope_theta, scaling)` of a Hugging Face config.json, read as transformers reads it: 4.x's
    `rope_theta` + `rope_scaling` (`type` or `rope_type`) or 5.x's `rope_parameters`, with
    transformers' defaults (`original_max_position_embeddings` from `max_position_embeddings`; a
    YaRN `factor` of null from their ratio)."""
    where = "rope_scaling" if hf.get("rope_scaling") is not None else "rope_parameters"
    raw = hf.get(where)
    check(raw is None or isinstance(raw, dict), f"config.json {where}={raw!r} must be a mapping or null")
    raw = dict(raw or {})
    theta = raw.pop("rope_theta", hf.get("rope_theta", 10_000.0))
    check(isinstance(theta, (int, float)) and not isinstance(theta, bool),
          f"config.json rope_theta={theta!r} must be a number")
    partial = raw.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    check(partial == 1.0, f"config.json partial_rotary_factor={partial!r} is not supported (Llama rotates whole heads)")
    rope_type = raw.pop("rope_type", None) or raw.pop("type", None) or "default"
    raw.pop("type", None)
    if rope_type == "default":
        return float(theta), None
    if rope_type in ("yarn", "llama3"):
        raw.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
    if rope_type == "yarn" and "factor" in raw and raw["factor"] is None:
        raw["factor"] = hf.get("max_position_embeddings", 8192) / raw["original_max_position_embeddings"]
    names = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type", "type"}
    unknown = sorted(set(raw) - names)
    check(not unknown, f"config.json {where} has key(s) {', '.join(unknown)} that no supported rope_type reads")
    try:
        return float(theta), RopeScaling(rope_type=rope_type, **raw)
    except UserError as err:
        raise UserError(f"config.json {where}: {err}") from None


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_ids_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """`bos_token_id`, `eos_token_id` (a tuple) and `pad_token_id` of a Hugging Face config.json;
    null or absent ids stay None (never 0: a null id means the model has no such token)."""
    ids: dict[str, Any] = {}
    for name in SPECIAL_IDS:
        value = hf.get(name)
        items = value if name == "eos_token_id" and isinstance(value, list) else [value]
        check(all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in items),
              f"config.json {name}={value!r} must be a token id, null" + (" or a list of ids" if name == "eos_token_id"
                                                                         else ""))
        ids[name] = tuple(value) if isinstance(value, list) else value
    if isinstance(ids["eos_token_id"], int):
        ids["eos_token_id"] = (ids["eos_token_id"],)
    return ids


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama-3 architecture (shapes, RoPE) plus how to run it (dtype, scan, remat, attention)."""

    vocab_size: int = 128_256
    hidden_size: int = 4096
    intermediate_size: int = 14_336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    # Special token ids; None where the model has none (a Hugging Face `null`), kept as None end to end.
    bos_token_id: int | None = 128_000
    eos_token_id: tuple[int, ...] | None = (128_001, 128_009)
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # How to run it.
    dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "full"
    attention: str = "reference"
    attention_block_size: int = 512
    attention_kernel: str = "auto"  # auto: the platform's fused kernel where it applies, else xla
    # Tokens per tile of a device's local sequence for the per-token work of a layer (output
    # projection, norm, MLP), each tile recomputed on its own in the backward pass; 0: chosen from
    # the shape (`model.llama.seq_tile_for`), the whole local sequence when it is short.
    seq_tile: int = 0
    embed_lookup: str = "sharded"  # sharded: the table's own shards look tokens up; gathered: whole table

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings", "attention_block_size"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0, f"{name}={value!r} must be a positive integer")
        check(self.num_heads % self.num_kv_heads == 0,
               f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
        check(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        check(self.rope_theta > 0 and math.isfinite(self.rope_theta),
               f"rope_theta={self.rope_theta} must be a positive number")
        if self.rope_scaling is not None and self.rope_scaling.rope_type == "default":
            object.__setattr__(self, "rope_scaling", None)  # `rope: {type: default}` is no scaling
        check(self.rms_norm_eps > 0, f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        for name, token in (("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id),
                            *(("eos_token_id", t) for t in self.eos_token_id or ())):
            check(token is None or (isinstance(token, int) and not isinstance(token, bool)
                                    and 0 <= token < self.vocab_size),
                  f"special token id {token!r} ({name}) is outside vocab_size={self.vocab_size}")
        check(self.dtype in DTYPES, f"dtype={self.dtype!r} is not one of {DTYPES}")
        check(self.remat in REMAT_POLICIES, f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        check(self.attention in ATTENTION_IMPLS,
               f"attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
        check(isinstance(self.seq_tile, int) and self.seq_tile >= 0,
              f"seq_tile={self.seq_tile!r} must be an integer >= 0 (0: chosen from the shape)")
        check(self.embed_lookup in EMBED_LOOKUPS, f"embed_lookup={self.embed_lookup!r} is not one of {EMBED_LOOKUPS}")
        check(self.attention_kernel in ATTENTION_KERNELS,
               f"attention_kernel={self.attention_kernel!r} is not one of {ATTENTION_KERNELS}")

    @property
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_layers * per_layer + d + head

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # Hugging Face config.json ------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **runtime) -> ModelConfig:
        """Builds a config from a Hugging Face Llama `config.json` dict; refuses other architectures."""
        arch = hf.get("architectures") or ["LlamaForCausalLM"]
        model_type = hf.get("model_type", "llama")
        check(model_type == "llama" and arch[0] == "LlamaForCausalLM",
               f"unsupported architecture {arch[0]!r} (model_type={model_type!r}); "
               "only Llama (LlamaForCausalLM) checkpoints can be imported")
        check(hf.get("sliding_window") in (None, 0),
               f"sliding_window={hf.get('sliding_window')} is not supported (Llama uses full attention)")
        check(hf.get("hidden_act", "silu") == "silu",
               f"hidden_act={hf.get('hidden_act')!r} is not supported (Llama uses 'silu')")
        check(not hf.get("attention_bias") and not hf.get("mlp_bias"),
               "attention_bias / mlp_bias are not supported (Llama-3 has no biases)")
        theta, rope_scaling = rope_from_hf(hf)
        num_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **special_ids_from_hf(hf),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            **runtime,
        )

    def special_ids_hf(self) -> dict[str, Any]:
        """The special token ids as config.json and generation_config.json write them (None -> null,
        one eos id as an int, several as a list)."""
        eos = self.eos_token_id
        return {"bos_token_id": self.bos_token_id,
                "eos_token_id": None if eos is None else (eos[0] if len(eos) == 1 else list(eos)),
                "pad_token_id": self.pad_token_id}

    def to_hf(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The Hugging Face `config.json` dict (written in the pre-5.0 layout every loader reads)."""
        rope_scaling = None if self.rope_scaling is None else self.rope_scaling.to_hf()
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": self.initializer_range,
            **self.special_ids_hf(),
            "torch_dtype": torch_dtype,
            "use_cache": True,
        }


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes (batch over dp and fsdp, sequence over sp (the ring) and ulysses (the
    all-to-all), heads and MLP over tp); one axis may be -1 to take the remaining devices."""

    dp: int = 1
    fsdp: int = 1
    sp: int = 1
    ulysses: int = 1
    tp: int = 1

    def __post_init__(self):
        sizes = [getattr(self, a) for a in MESH_AXES]
        for axis, size in zip(MESH_AXES, sizes):
            check(isinstance(size, int) and (size >= 1 or size == -1),
                   f"mesh.{axis}={size!r} must be a positive integer or -1 (fill the devices)")
        check(sizes.count(-1) <= 1, f"mesh {self.spec()} has more than one axis set to -1")

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """Parses `dp=2,sp=4` (unnamed axes are 1)."""
        sizes = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            check(sep == "=" and name in MESH_AXES,
                   f"bad mesh item {part!r} in {text!r}: expected axis=size with axis in {MESH_AXES}")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise UserError(f"bad mesh size {value!r} for axis {name} in {text!r}") from None
        return cls(**sizes)

    def resolve(self, num_devices: int) -> MeshConfig:
        """Fills a -1 axis and checks that the product equals `num_devices`."""
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        known = math.prod(s for s in sizes.values() if s != -1)
        for axis, size in sizes.items():
            if size == -1:
                check(num_devices % known == 0,
                       f"mesh {self.spec()}: {num_devices} devices are not divisible by {known}")
                sizes[axis] = num_devices // known
        resolved = MeshConfig(**sizes)
        check(math.prod(sizes.values()) == num_devices,
               f"mesh {resolved.spec()} needs {math.prod(sizes.values())} devices but {num_devices} "
               "are available (use --cpu-devices N to simulate CPU devices)")
        return resolved

    def spec(self) -> str:
        """`dp=2,fsdp=1,sp=4,tp=1`: every axis, `ulysses` only when used (so 4-axis specs read as before)."""
        return ",".join(f"{a}={getattr(self, a)}" for a in MESH_AXES if a != "ulysses" or self.ulysses != 1)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    """Loads a model YAML (`configs/models/*.yaml`) with optional `key=value` overrides."""
    return from_dict(ModelConfig, apply_overrides(load_yaml(path), list(overrides)))
