"""The stage schedule: every stage of a recipe resolved (theta, length, remat, mesh) and checked
against the devices, the init sources and the prepared data before anything compiles, once per run.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from lwm_jax.attention.layout import check_heads, ring_block
from lwm_jax.config import MeshConfig, ModelConfig, RecipeConfig, StageConfig, from_dict
from lwm_jax.data.manifest import load_manifest
from lwm_jax.data.pipeline import load_prepared
from lwm_jax.errors import UserError
from lwm_jax.model.rope import theta_for
from lwm_jax.model.store import read_hf_config, read_metadata


@dataclasses.dataclass(frozen=True)
class ScheduledStage:
    """A stage with everything resolved: model config (theta, length, remat) and mesh."""

    index: int
    stage: StageConfig
    model: ModelConfig
    mesh: MeshConfig
    theta_pending: bool = False  # rope_theta: sweep, not yet run (model holds the scaling-law value)

    @property
    def name(self) -> str:
        return self.stage.name


def init_source(stage: StageConfig, recipe: RecipeConfig) -> ModelConfig:
    """The model config the first stage starts from (HF config, checkpoint metadata or recipe)."""
    kind, _, target = stage.init_from.partition(":")
    if kind == "hf":
        if not Path(target).is_dir():
            raise UserError(f"stages.{stage.name}.init_from: Hugging Face folder {target} does not exist")
        source = read_hf_config(target)
    elif kind == "ckpt":
        source = from_dict(ModelConfig, read_metadata(target)["model"])
    else:
        return recipe.model
    shape_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "tie_word_embeddings")
    diff = [f"{f}: recipe {getattr(recipe.model, f)} vs {getattr(source, f)}" for f in shape_fields
            if getattr(recipe.model, f) != getattr(source, f)]
    if diff:
        raise UserError(f"stages.{stage.name}.init_from={stage.init_from} does not match the recipe model ("
                        + "; ".join(diff) + ")")
    return source


def stage_model(recipe: RecipeConfig, stage: StageConfig, previous: ModelConfig,
                swept: float | None = None) -> ModelConfig:
    """The model a stage trains: the recipe's, with the stage's length, remat, RoPE scaling (the
    previous model's when the stage gives none) and theta, a number or a rule applied to `previous`
    (the model the stage starts from: the previous stage's, or the first stage's init source).
    `swept`: the value a sweeping stage found (None before its search: the scaling-law theta, or the
    recipe's value of the swept field, stands in; shapes do not depend on them)."""
    where = f"stages.{stage.name}"
    if stage.rope_theta == "sweep" and swept is not None:
        theta = swept
    elif stage.rope_theta in ("scaling-law", "ntk", "sweep"):
        rule = "scaling-law" if stage.rope_theta == "sweep" else stage.rope_theta
        theta = theta_for(rule, stage.seq_len, previous.rope_theta, recipe.model.head_dim,
                          previous.max_position_embeddings)
    else:
        theta = float(stage.rope_theta)
    if not (theta > 0 and math.isfinite(theta)):
        raise UserError(f"{where}.rope_theta resolves to {theta}; it must be > 0")
    rope = previous.rope_scaling if stage.rope is None else stage.rope
    if stage.swept not in (None, "rope_theta") and swept is not None:
        rope = dataclasses.replace(rope, **{stage.swept: swept})
    return recipe.model.replace(rope_theta=theta, rope_scaling=rope, max_position_embeddings=stage.seq_len,
                                remat=stage.remat or recipe.model.remat)


def schedule_recipe(recipe: RecipeConfig, num_devices: int | None, check_sources: bool = True,
                    swept: dict[str, float] | None = None, only_stage: str | None = None) -> list[ScheduledStage]:
    """Resolves theta, mesh and model per stage (`stage_model`) and checks everything that can fail
    before compiling.

    `num_devices=None` sizes each stage by its own mesh (which then may not use -1), as the planner
    does for recipes whose stages run on different clusters. `check_sources=False` skips looking at
    init folders (planning on a machine that does not hold the weights). `swept` holds the values
    that sweeping stages (`rope_theta: sweep`, or `sweep: FIELD` of their `rope`) found in an earlier
    run; a stage not yet swept is marked `theta_pending` and its model (and those of the stages
    after it) is provisional until the runner resolves it where the stage starts. `only_stage`:
    schedule (and check the mesh of) that stage alone; the others still pass their theta and RoPE on
    to it.
    """
    plans = []
    swept = swept or {}
    previous = init_source(recipe.stages[0], recipe) if check_sources else recipe.model
    for index, stage in enumerate(recipe.stages):
        where = f"stages.{stage.name}"
        pending = stage.swept is not None and stage.name not in swept
        if stage.swept is not None and stage.init_from == "scratch":
            raise UserError(f"{where}: a {stage.swept} sweep needs trained weights to measure, but the stage "
                            "starts from scratch; give a number or a rule")
        if check_sources and index > 0 and stage.init_from != "previous":
            init_source(stage, recipe)  # checks the folder exists and its shapes match
        model = stage_model(recipe, stage, previous, swept.get(stage.name))
        previous = model
        if only_stage not in (None, stage.name):
            continue
        mesh_cfg = stage.mesh or recipe.mesh
        if num_devices is None and -1 in mesh_cfg.shape:
            raise UserError(f"{where}: mesh {mesh_cfg.spec()} has a -1 axis; give the device count (--devices)")
        mesh = mesh_cfg.resolve(num_devices if num_devices is not None else math.prod(mesh_cfg.shape))
        _check_stage(where, stage, model, mesh)
        plans.append(ScheduledStage(index, stage, model, mesh, theta_pending=pending))
    return plans


def _check_stage(where: str, stage: StageConfig, model: ModelConfig, mesh: MeshConfig) -> None:
    data_ways = mesh.dp * mesh.fsdp
    if stage.batch_size % data_ways:
        raise UserError(f"{where}.batch_size={stage.batch_size} must be divisible by dp*fsdp={data_ways} "
                        f"(mesh {mesh.spec()}); the global batch per step is batch_size*grad_accum")
    rows = stage.theta_sweep.sequences
    if stage.swept is not None and rows and rows % data_ways:
        raise UserError(f"{where}.theta_sweep.sequences={rows} must be divisible by dp*fsdp={data_ways}")
    if model.num_heads % mesh.tp or model.num_kv_heads % mesh.tp:
        raise UserError(f"{where}: num_heads={model.num_heads} and num_kv_heads={model.num_kv_heads} must be "
                        f"divisible by tp={mesh.tp}")
    if model.attention == "ring":
        check_heads(model.num_heads, model.num_kv_heads, mesh.tp, mesh.ulysses)
        ring_block(stage.seq_len, mesh.sp, model.attention_block_size, mesh.ulysses)
    elif stage.seq_len % (mesh.sp * mesh.ulysses):
        shards = mesh.sp * mesh.ulysses
        below, up = stage.seq_len // shards * shards, -(-stage.seq_len // shards) * shards
        nearest = f"{below:,} or {up:,}" if below else f"{up:,}"
        raise UserError(f"{where}.seq_len={stage.seq_len} must be divisible by sp*ulysses={shards}; "
                        f"the nearest valid lengths are {nearest}")


def check_data(recipe: RecipeConfig, plan: ScheduledStage) -> None:
    """The stage's prepared data exists, matches its seq_len, and its token ids fit the model's vocab."""
    load_prepared(recipe.data, plan.stage.seq_len)
    for directory in recipe.data.resolved_paths(plan.stage.seq_len):
        vocab = load_manifest(directory)["tokenizer"]["vocab_size"]
        if vocab > plan.model.vocab_size:
            raise UserError(f"prepared dataset {directory} uses a tokenizer with {vocab} ids but the model's "
                            f"vocab_size is {plan.model.vocab_size}")
