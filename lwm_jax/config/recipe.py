"""Training recipes: the optimizer, the theta sweep, the stages of a context extension and the
recipe that orders them, loaded from YAML with dotted `key=value` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any

from lwm_jax.config.data import DataConfig
from lwm_jax.config.model import REMAT_POLICIES, ROPE_FIELDS, ROPE_SCALARS, MeshConfig, ModelConfig, RopeScaling
from lwm_jax.config.schema import apply_overrides, check, from_dict, load_yaml
from lwm_jax.errors import UserError

THETA_RULES = ("scaling-law", "ntk", "sweep")
RECIPE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # one folder name: no path separators, no '..'
MOMENT_DTYPES = ("float32", "bfloat16")
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
    moment_dtype: str = "float32"  # bfloat16: both AdamW moments stored in bf16 (half the state)
    offload: bool = False  # float32 masters and moments in host memory, updated one layer at a time

    def __post_init__(self):
        check(self.lr > 0, f"optimizer.lr={self.lr} must be > 0")
        check(self.warmup_steps >= 0, f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")
        check(self.schedule in SCHEDULES, f"optimizer.schedule={self.schedule!r} is not one of {SCHEDULES}")
        check(0 <= self.min_lr_ratio <= 1, f"optimizer.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"optimizer betas ({self.b1}, {self.b2}) must be in [0, 1)")
        check(self.eps > 0, f"optimizer.eps={self.eps} must be > 0")
        check(self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        check(self.clip_norm >= 0, f"optimizer.clip_norm={self.clip_norm} must be >= 0 (0 disables clipping)")
        check(self.moment_dtype in MOMENT_DTYPES,
              f"optimizer.moment_dtype={self.moment_dtype!r} is not one of {MOMENT_DTYPES}")


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
        check(self.num >= 1, f"theta_sweep.num={self.num} must be >= 1")
        check(self.span >= 1 and math.isfinite(self.span), f"theta_sweep.span={self.span} must be >= 1")
        check(self.iterations >= 2, f"theta_sweep.iterations={self.iterations} must be >= 2")
        check(self.sequences is None or self.sequences >= 1,
               f"theta_sweep.sequences={self.sequences} must be >= 1")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One context-extension stage: its length, RoPE theta, batch, steps, optimizer and init."""

    name: str
    seq_len: int
    steps: int
    rope_theta: str = "scaling-law"  # a number; scaling-law / ntk from the previous stage; or sweep
    # RoPE scaling method (transformers' fields: {type: linear|yarn|llama3|default, factor, ...});
    # None: the method of the model the stage starts from.
    rope: RopeScaling | None = None
    # One scalar field of `rope` (e.g. factor) searched like `rope_theta: sweep`, centred on its value.
    sweep: str | None = None
    theta_sweep: ThetaSweepConfig = ThetaSweepConfig()  # the search, used when rope_theta or `sweep` sweeps
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
        check(bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(),
               f"stage name {self.name!r} must be a non-empty word (letters, digits, - and _)")
        for field in ("seq_len", "steps", "batch_size", "grad_accum", "keep_checkpoints"):
            value = getattr(self, field)
            check(isinstance(value, int) and value > 0, f"{where}.{field}={value!r} must be a positive integer")
        check(self.checkpoint_every >= 0, f"{where}.checkpoint_every={self.checkpoint_every} must be >= 0")
        if self.rope_theta not in THETA_RULES:
            try:
                theta = float(self.rope_theta)
            except ValueError:
                raise UserError(f"{where}.rope_theta={self.rope_theta!r} must be a number or one of "
                                f"{THETA_RULES}") from None
            check(theta > 0 and math.isfinite(theta), f"{where}.rope_theta={self.rope_theta} must be > 0")
        if self.sweep is not None:
            check(self.rope_theta != "sweep", f"{where}: rope_theta: sweep and sweep={self.sweep} both ask for a "
                  "search; a stage sweeps one scalar")
            required, optional = ROPE_FIELDS[self.rope.rope_type if self.rope else "default"]
            fields = [f for f in required + optional if f in ROPE_SCALARS]
            check(self.sweep in fields, f"{where}.sweep={self.sweep!r} must be a real-valued field of the stage's "
                  f"rope ({', '.join(fields) or 'none: give rope with a scaling type'})")
            check(getattr(self.rope, self.sweep) is not None,
                  f"{where}.sweep={self.sweep} needs rope.{self.sweep} set: the search is centred on it")
        if self.lr is not None:
            check(self.lr > 0, f"{where}.lr={self.lr} must be > 0")
        if self.remat is not None:
            check(self.remat in REMAT_POLICIES, f"{where}.remat={self.remat!r} is not one of {REMAT_POLICIES}")
        kind, _, target = self.init_from.partition(":")
        check(self.init_from in ("previous", "scratch") or (kind in ("hf", "ckpt") and target),
               f"{where}.init_from={self.init_from!r} must be previous, scratch, hf:DIR or ckpt:DIR")

    @property
    def swept(self) -> str | None:
        """The scalar searched before training: `rope_theta`, a field of `rope`, or None."""
        return "rope_theta" if self.rope_theta == "sweep" else self.sweep

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
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig(dp=-1)
    seed: int = 0
    loss_chunk: int = 2048
    max_bad_steps: int = 3  # stop after this many non-finite steps in a row
    peak_tflops: float | None = None  # per device, for MFU; None: known table or measured (CPU)
    log_every: int = 1

    def __post_init__(self):
        check(bool(RECIPE_NAME.fullmatch(self.name)) and self.name not in (".", ".."),
              f"recipe name {self.name!r} must be a plain folder name (letters, digits, '.', '-' and '_', "
              "not starting with '.' or '-'): it names the run folder runs/NAME")
        check(len(self.stages) > 0, "recipe has no stages")
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        check(not dupes, f"stage names must be unique; repeated: {', '.join(dupes)}")
        check(self.stages[0].init_from != "previous",
               f"stages.{self.stages[0].name}.init_from=previous but it is the first stage "
               "(use scratch, hf:DIR or ckpt:DIR)")
        check(self.loss_chunk > 0, f"loss_chunk={self.loss_chunk} must be > 0")
        check(self.max_bad_steps > 0, f"max_bad_steps={self.max_bad_steps} must be > 0")

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        names = ", ".join(s.name for s in self.stages)
        raise UserError(f"recipe {self.name!r} has no stage {name!r} (stages: {names})")


def _stages_by_name(raw: dict[str, Any]) -> dict[str, Any]:
    """Recipe dict with `stages` as a name -> mapping dict, so overrides can say stages.NAME.key."""
    stages = raw.get("stages")
    check(isinstance(stages, list) and all(isinstance(s, dict) and "name" in s for s in stages),
           "recipe `stages` must be a list of mappings, each with a `name`")
    names = [str(s["name"]) for s in stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    check(not dupes, f"stage names must be unique; repeated: {', '.join(dupes)}")  # before the dict merges them
    return {**raw, "stages": dict(zip(names, stages))}


def _check_top_level_keys(raw: dict[str, Any], path: Path) -> None:
    """Names a misspelt top-level key before the recipe's parts are read (a missing `stages` or
    `model` would otherwise be reported as that part's absence, without the key that was meant)."""
    valid = [f.name for f in dataclasses.fields(RecipeConfig)]
    for key in raw:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"{path}: unknown recipe key {key!r}{hint} (valid: {', '.join(sorted(valid))})")
    missing = [k for k in ("name", "model", "stages") if k not in raw]
    check(not missing, f"{path}: the recipe has no {', '.join(repr(k) for k in missing)}")


def recipe_dict(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The recipe YAML as a plain dict with overrides applied and the model file inlined."""
    path = Path(path)
    raw = load_yaml(path)
    _check_top_level_keys(raw, path)
    raw = _stages_by_name(raw)
    stage_names = set(raw["stages"])
    for item in overrides:
        parts = item.partition("=")[0].split(".")
        if parts[0] == "stages":
            check(len(parts) >= 3 and parts[1] in stage_names,
                   f"override {item!r}: expected stages.<name>.<key> with name in {sorted(stage_names)}")
    if isinstance(raw.get("model"), str):
        raw["model"] = {"base": raw["model"]}  # so `model.KEY=VALUE` overrides apply on top of the file
    raw = apply_overrides(raw, list(overrides))
    raw["stages"] = list(raw["stages"].values())
    model = raw.get("model")
    check(isinstance(model, dict), "recipe `model` must be a model YAML path or a mapping")
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
    raw = recipe_dict(path, overrides)
    raw["data"] = raw.get("data") or {}
    check(isinstance(raw["data"], dict), "recipe `data` must be a mapping")
    return from_dict(RecipeConfig, raw)
