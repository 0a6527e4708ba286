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
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash")  # per-block kernels of blockwise and ring
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")
DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("dp", "fsdp", "sp", "tp")
# Fields that say how a model runs, not what it computes: a checkpoint loads, and a training run
# resumes, with any of them changed.
RUN_FIELDS = ("dtype", "scan_layers", "remat", "attention", "attention_block_size", "attention_kernel")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Hugging Face `rope_scaling` of type `llama3` (Llama-3.1 checkpoints): inverse frequencies
    whose wavelength exceeds `original_max_position_embeddings / low_freq_factor` are divided by
    `factor`, those shorter than `... / high_freq_factor` kept, the band between interpolated."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"

    def __post_init__(self):
        check(self.rope_type == "llama3",
               f"rope_scaling.rope_type={self.rope_type!r} is not supported (valid: 'llama3' or no rope_scaling)")
        check(self.factor > 0, f"rope_scaling.factor={self.factor} must be > 0")
        check(self.high_freq_factor > self.low_freq_factor,
               f"rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
               f"low_freq_factor={self.low_freq_factor}")


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
    bos_token_id: int = 128_000
    eos_token_id: tuple[int, ...] = (128_001, 128_009)
    initializer_range: float = 0.02
    # How to run it.
    dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "full"
    attention: str = "reference"
    attention_block_size: int = 512
    attention_kernel: str = "auto"  # auto: the platform's fused kernel where it applies, else xla

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
        check(self.rms_norm_eps > 0, f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        for token in (self.bos_token_id, *self.eos_token_id):
            check(0 <= token < self.vocab_size,
                   f"special token id {token} (bos_token_id/eos_token_id) is outside vocab_size={self.vocab_size}")
        check(self.dtype in DTYPES, f"dtype={self.dtype!r} is not one of {DTYPES}")
        check(self.remat in REMAT_POLICIES, f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        check(self.attention in ATTENTION_IMPLS,
               f"attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
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
        # transformers >= 5 writes `rope_parameters`; older versions `rope_theta` + `rope_scaling`.
        params = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or params
        theta = hf.get("rope_theta", params.get("rope_theta", 10_000.0))
        rope_scaling = None
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "llama3":
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
        else:
            check(rope_type == "default",
                   f"rope_scaling type {rope_type!r} is not supported (valid: 'llama3' or none)")
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id", 128_001)
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
            bos_token_id=hf.get("bos_token_id", 128_000) or 0,
            eos_token_id=tuple(eos) if isinstance(eos, list) else (eos,),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            **runtime,
        )

    def to_hf(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The Hugging Face `config.json` dict (written in the pre-5.0 layout every loader reads)."""
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = dataclasses.asdict(self.rope_scaling)
        eos = list(self.eos_token_id)
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
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "torch_dtype": torch_dtype,
            "use_cache": True,
        }


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes (batch over dp and fsdp, sequence over sp, heads and MLP over tp);
    one axis may be -1 to take the remaining devices."""

    dp: int = 1
    fsdp: int = 1
    sp: int = 1
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
        return ",".join(f"{a}={getattr(self, a)}" for a in MESH_AXES)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    """Loads a model YAML (`configs/models/*.yaml`) with optional `key=value` overrides."""
    return from_dict(ModelConfig, apply_overrides(load_yaml(path), list(overrides)))
