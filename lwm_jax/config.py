"""Typed configuration: frozen dataclasses loaded from YAML with `key=value` overrides.

Every field is validated in `__post_init__`, so a bad config fails with a message naming the field
before any JAX work starts. `ModelConfig` also converts to and from a Hugging Face `config.json`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lwm_jax.errors import UserError

ATTENTION_IMPLS = ("reference", "blockwise", "ring")
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash")  # per-block kernels of blockwise and ring
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")
DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("dp", "fsdp", "sp", "tp")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Hugging Face `rope_scaling` of type `llama3` (Llama-3.1 checkpoints)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"

    def __post_init__(self):
        _check(self.rope_type == "llama3",
               f"rope_scaling.rope_type={self.rope_type!r} is not supported (valid: 'llama3' or no rope_scaling)")
        _check(self.factor > 0, f"rope_scaling.factor={self.factor} must be > 0")
        _check(self.high_freq_factor > self.low_freq_factor,
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
            _check(isinstance(value, int) and value > 0, f"{name}={value!r} must be a positive integer")
        _check(self.num_heads % self.num_kv_heads == 0,
               f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
        _check(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        _check(self.rope_theta > 0 and math.isfinite(self.rope_theta),
               f"rope_theta={self.rope_theta} must be a positive number")
        _check(self.rms_norm_eps > 0, f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        for token in (self.bos_token_id, *self.eos_token_id):
            _check(0 <= token < self.vocab_size,
                   f"special token id {token} (bos_token_id/eos_token_id) is outside vocab_size={self.vocab_size}")
        _check(self.dtype in DTYPES, f"dtype={self.dtype!r} is not one of {DTYPES}")
        _check(self.remat in REMAT_POLICIES, f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        _check(self.attention in ATTENTION_IMPLS,
               f"attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
        _check(self.attention_kernel in ATTENTION_KERNELS,
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
        _check(model_type == "llama" and arch[0] == "LlamaForCausalLM",
               f"unsupported architecture {arch[0]!r} (model_type={model_type!r}); "
               "only Llama (LlamaForCausalLM) checkpoints can be imported")
        _check(hf.get("sliding_window") in (None, 0),
               f"sliding_window={hf.get('sliding_window')} is not supported (Llama uses full attention)")
        _check(hf.get("hidden_act", "silu") == "silu",
               f"hidden_act={hf.get('hidden_act')!r} is not supported (Llama uses 'silu')")
        _check(not hf.get("attention_bias") and not hf.get("mlp_bias"),
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
            _check(rope_type == "default",
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
    """Device mesh axis sizes; one axis may be -1 to take the remaining devices."""

    dp: int = 1
    fsdp: int = 1
    sp: int = 1
    tp: int = 1

    def __post_init__(self):
        sizes = [getattr(self, a) for a in MESH_AXES]
        for axis, size in zip(MESH_AXES, sizes):
            _check(isinstance(size, int) and (size >= 1 or size == -1),
                   f"mesh.{axis}={size!r} must be a positive integer or -1 (fill the devices)")
        _check(sizes.count(-1) <= 1, f"mesh {self.spec()} has more than one axis set to -1")

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """Parses `dp=2,sp=4` (unnamed axes are 1)."""
        sizes = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            _check(sep == "=" and name in MESH_AXES,
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
                _check(num_devices % known == 0,
                       f"mesh {self.spec()}: {num_devices} devices are not divisible by {known}")
                sizes[axis] = num_devices // known
        resolved = MeshConfig(**sizes)
        _check(math.prod(sizes.values()) == num_devices,
               f"mesh {resolved.spec()} needs {math.prod(sizes.values())} devices but {num_devices} "
               "are available (use --cpu-devices N to simulate CPU devices)")
        return resolved

    def spec(self) -> str:
        return ",".join(f"{a}={getattr(self, a)}" for a in MESH_AXES)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)


# Generic YAML <-> dataclass plumbing ---------------------------------------------------------------


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        (elem, *_rest) = typing.get_args(tp)
        return tuple(_convert(elem, v, f"{where}[{i}]") for i, v in enumerate(items))
    if origin is list:
        _check(isinstance(value, (list, tuple)), f"{where} must be a list, got {value!r}")
        (elem,) = typing.get_args(tp)
        return [_convert(elem, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e6` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{where}={value!r} must be a number")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{where}={value!r} must be an integer")
        return value
    if tp is bool:
        _check(isinstance(value, bool), f"{where}={value!r} must be true or false")
        return value
    if tp is str:
        _check(isinstance(value, (str, int, float)), f"{where}={value!r} must be a string")
        return str(value)
    return value


def from_dict(cls, data: dict[str, Any], where: str = ""):
    """Builds dataclass `cls` from a plain dict, checking names and types; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    prefix = f"{where}." if where else ""
    _check(not unknown, f"unknown config key(s) {', '.join(prefix + k for k in unknown)} "
                        f"(valid: {', '.join(sorted(names))})")
    kwargs = {k: _convert(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> dict[str, Any]:
    """Plain-data dict of a config dataclass (tuples become lists), fit for YAML or JSON."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(obj))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of `data` with dotted `key=value` overrides applied (values parsed as YAML)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        _check(sep == "=" and key, f"bad override {item!r}: expected key=value, e.g. model.remat=none")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            _check(isinstance(node, dict), f"bad override {item!r}: {part} is not a mapping")
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping, with a clear error for a missing file or bad syntax."""
    path = Path(path)
    _check(path.is_file(), f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}".splitlines()[0]) from None
    _check(isinstance(data, dict), f"{path} must hold a YAML mapping at the top level")
    return data


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    """Loads a model YAML (`configs/models/*.yaml`) with optional `key=value` overrides."""
    return from_dict(ModelConfig, apply_overrides(load_yaml(path), list(overrides)))


# Training recipes ----------------------------------------------------------------------------------

THETA_RULES = ("scaling-law", "ntk", "sweep")
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule (defaults: EasyContext, which Gradient trained with)."""

    lr: float = 2e-5
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    def __post_init__(self):
        _check(self.lr > 0, f"optimizer.lr={self.lr} must be > 0")
        _check(self.warmup_steps >= 0, f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")
        _check(self.schedule in SCHEDULES, f"optimizer.schedule={self.schedule!r} is not one of {SCHEDULES}")
        _check(0 <= self.min_lr_ratio <= 1, f"optimizer.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"optimizer betas ({self.b1}, {self.b2}) must be in [0, 1)")
        _check(self.eps > 0, f"optimizer.eps={self.eps} must be > 0")
        _check(self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        _check(self.clip_norm >= 0, f"optimizer.clip_norm={self.clip_norm} must be >= 0 (0 disables clipping)")


@dataclasses.dataclass(frozen=True)
class ThetaSweepConfig:
    """How a stage with `rope_theta: sweep` picks its theta before training: the mean NLL of the
    starting params on `sequences` of the stage's own data at `num` thetas log-spaced over
    [center/span, center*span] around the scaling-law value (or a golden-section search)."""

    num: int = 7
    span: float = 8.0
    search: bool = False
    iterations: int = 10  # golden-section evaluations, with search
    sequences: int | None = None  # None: dp*fsdp of the stage's mesh (one per data shard)

    def __post_init__(self):
        _check(self.num >= 1, f"theta_sweep.num={self.num} must be >= 1")
        _check(self.span >= 1 and math.isfinite(self.span), f"theta_sweep.span={self.span} must be >= 1")
        _check(self.iterations >= 2, f"theta_sweep.iterations={self.iterations} must be >= 2")
        _check(self.sequences is None or self.sequences >= 1,
               f"theta_sweep.sequences={self.sequences} must be >= 1")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One context-extension stage: its length, RoPE theta, batch, steps, optimizer and init."""

    name: str
    seq_len: int
    steps: int
    rope_theta: str = "scaling-law"  # a number; scaling-law / ntk from the previous stage; or sweep
    theta_sweep: ThetaSweepConfig = ThetaSweepConfig()  # used when rope_theta is sweep
    batch_size: int = 1  # global sequences per micro-step
    grad_accum: int = 1
    lr: float | None = None  # shortcut for optimizer.lr
    optimizer: OptimizerConfig = OptimizerConfig()
    remat: str | None = None  # None: the model's policy
    checkpoint_every: int = 0  # 0: only at the end of the stage (and on SIGTERM)
    keep_checkpoints: int = 2
    mesh: MeshConfig | None = None  # None: the recipe's mesh
    init_from: str = "previous"  # previous | scratch | hf:DIR | ckpt:DIR

    def __post_init__(self):
        where = f"stages.{self.name}"
        _check(bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(),
               f"stage name {self.name!r} must be a non-empty word (letters, digits, - and _)")
        for field in ("seq_len", "steps", "batch_size", "grad_accum", "keep_checkpoints"):
            value = getattr(self, field)
            _check(isinstance(value, int) and value > 0, f"{where}.{field}={value!r} must be a positive integer")
        _check(self.checkpoint_every >= 0, f"{where}.checkpoint_every={self.checkpoint_every} must be >= 0")
        if self.rope_theta not in THETA_RULES:
            try:
                theta = float(self.rope_theta)
            except ValueError:
                raise UserError(f"{where}.rope_theta={self.rope_theta!r} must be a number or one of "
                                f"{THETA_RULES}") from None
            _check(theta > 0 and math.isfinite(theta), f"{where}.rope_theta={self.rope_theta} must be > 0")
        if self.lr is not None:
            _check(self.lr > 0, f"{where}.lr={self.lr} must be > 0")
        if self.remat is not None:
            _check(self.remat in REMAT_POLICIES, f"{where}.remat={self.remat!r} is not one of {REMAT_POLICIES}")
        kind, _, target = self.init_from.partition(":")
        _check(self.init_from in ("previous", "scratch") or (kind in ("hf", "ckpt") and target),
               f"{where}.init_from={self.init_from!r} must be previous, scratch, hf:DIR or ckpt:DIR")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.steps

    @property
    def optimizer_config(self) -> OptimizerConfig:
        """The optimizer with the stage's `lr` shortcut applied."""
        return self.optimizer if self.lr is None else dataclasses.replace(self.optimizer, lr=self.lr)


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """A training recipe: the model, the default mesh, the data and an ordered list of stages."""

    name: str
    model: ModelConfig
    stages: tuple[StageConfig, ...]
    data: Any = None  # lwm_jax.data.config.DataConfig (typed there, to keep this module import-light)
    mesh: MeshConfig = MeshConfig(dp=-1)
    seed: int = 0
    loss_chunk: int = 2048
    max_bad_steps: int = 3  # stop after this many non-finite steps in a row
    peak_tflops: float | None = None  # per device, for MFU; None: known table or measured (CPU)
    log_every: int = 1

    def __post_init__(self):
        _check(len(self.stages) > 0, "recipe has no stages")
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        _check(not dupes, f"stage names must be unique; repeated: {', '.join(dupes)}")
        _check(self.stages[0].init_from != "previous",
               f"stages.{self.stages[0].name}.init_from=previous but it is the first stage "
               "(use scratch, hf:DIR or ckpt:DIR)")
        _check(self.loss_chunk > 0, f"loss_chunk={self.loss_chunk} must be > 0")
        _check(self.max_bad_steps > 0, f"max_bad_steps={self.max_bad_steps} must be > 0")

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise UserError(f"recipe {self.name!r} has no stage {name!r} (stages: {', '.join(s.name for s in self.stages)})")


def _stages_by_name(raw: dict[str, Any]) -> dict[str, Any]:
    """Recipe dict with `stages` as a name -> mapping dict, so overrides can say stages.NAME.key."""
    stages = raw.get("stages")
    _check(isinstance(stages, list) and all(isinstance(s, dict) and "name" in s for s in stages),
           "recipe `stages` must be a list of mappings, each with a `name`")
    return {**raw, "stages": {str(s["name"]): s for s in stages}}


def recipe_dict(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The recipe YAML as a plain dict with overrides applied and the model file inlined."""
    path = Path(path)
    raw = _stages_by_name(load_yaml(path))
    stage_names = set(raw["stages"])
    for item in overrides:
        parts = item.partition("=")[0].split(".")
        if parts[0] == "stages":
            _check(len(parts) >= 3 and parts[1] in stage_names,
                   f"override {item!r}: expected stages.<name>.<key> with name in {sorted(stage_names)}")
    if isinstance(raw.get("model"), str):
        raw["model"] = {"base": raw["model"]}  # so `model.KEY=VALUE` overrides apply on top of the file
    raw = apply_overrides(raw, list(overrides))
    raw["stages"] = list(raw["stages"].values())
    model = raw.get("model")
    _check(isinstance(model, dict), "recipe `model` must be a model YAML path or a mapping")
    if "base" in model:
        base = Path(model["base"])
        if not base.is_absolute() and not base.exists():
            base = path.parent / base
        if not base.exists():
            base = path.parent.parent.parent / model["base"]  # configs/recipes/x.yaml -> repo root
        model = {**load_yaml(base), **{k: v for k, v in model.items() if k != "base"}}
    raw["model"] = model
    return raw


def load_recipe(path: str | Path, overrides: list[str] = ()) -> RecipeConfig:
    """Loads a recipe YAML (`configs/recipes/*.yaml`) with dotted `key=value` overrides."""
    from lwm_jax.data.config import DataConfig

    raw = recipe_dict(path, overrides)
    data = raw.pop("data", None) or {}
    _check(isinstance(data, dict), "recipe `data` must be a mapping")
    recipe = from_dict(RecipeConfig, raw)
    return dataclasses.replace(recipe, data=from_dict(DataConfig, data, "data"))
