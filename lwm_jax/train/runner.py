"""The stage runner: plans and validates a whole recipe against the devices, then trains each stage
in order, handing the final params of one stage to the next.

A stage starts from the previous stage's final params (or an HF folder, a checkpoint, or scratch)
with a fresh optimizer and its own theta and seq_len. Rerunning the same command resumes the
unfinished stage from its last checkpoint, exactly, and skips finished ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lwm_jax.config import MeshConfig, ModelConfig, RecipeConfig, StageConfig, from_dict, to_dict
from lwm_jax.errors import UserError
from lwm_jax.model.rope import theta_for
from lwm_jax.progress import log, progress

FINAL_FILE = "final.json"
START_FILE = "start.json"
SWEEP_DIR = "theta_sweep"


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """A stage with everything resolved: model config (theta, length, remat) and mesh."""

    index: int
    stage: StageConfig
    model: ModelConfig
    mesh: MeshConfig
    theta_pending: bool = False  # rope_theta: sweep, not yet run (model holds the scaling-law value)

    @property
    def name(self) -> str:
        return self.stage.name


def _init_source(stage: StageConfig, recipe: RecipeConfig) -> ModelConfig:
    """The model config the first stage starts from (HF config, checkpoint metadata or recipe)."""
    kind, _, target = stage.init_from.partition(":")
    if kind == "hf":
        from lwm_jax.convert.hf import read_hf_config

        if not Path(target).is_dir():
            raise UserError(f"stages.{stage.name}.init_from: Hugging Face folder {target} does not exist")
        source = read_hf_config(target)
    elif kind == "ckpt":
        from lwm_jax.train.checkpoint import read_metadata

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


def plan_recipe(recipe: RecipeConfig, num_devices: int | None, check_sources: bool = True,
                swept: dict[str, float] | None = None) -> list[StagePlan]:
    """Resolves theta, mesh and model per stage and checks everything that can fail before compiling.

    `num_devices=None` sizes each stage by its own mesh (which then may not use -1), as the planner
    does for recipes whose stages run on different clusters. `check_sources=False` skips looking at
    init folders (planning on a machine that does not hold the weights). `swept` holds the thetas
    that `rope_theta: sweep` stages have found so far; a stage not yet swept is planned with the
    scaling-law value (shapes do not depend on theta) and marked `theta_pending`.
    """
    plans = []
    swept = swept or {}
    first = recipe.stages[0]
    previous = _init_source(first, recipe) if check_sources else recipe.model
    prev_theta, prev_len = previous.rope_theta, previous.max_position_embeddings
    for index, stage in enumerate(recipe.stages):
        where = f"stages.{stage.name}"
        pending = stage.rope_theta == "sweep" and stage.name not in swept
        if stage.rope_theta == "sweep" and stage.init_from == "scratch":
            raise UserError(f"{where}: rope_theta: sweep needs trained weights to measure, but the stage "
                            "starts from scratch; give a number or a rule")
        if stage.rope_theta == "sweep" and not pending:
            theta = swept[stage.name]
        elif stage.rope_theta in ("scaling-law", "ntk", "sweep"):
            rule = "scaling-law" if stage.rope_theta == "sweep" else stage.rope_theta
            theta = theta_for(rule, stage.seq_len, prev_theta, recipe.model.head_dim, prev_len)
        else:
            theta = float(stage.rope_theta)
        if not (theta > 0 and math.isfinite(theta)):
            raise UserError(f"{where}.rope_theta resolves to {theta}; it must be > 0")
        if check_sources and index > 0 and stage.init_from != "previous":
            _init_source(stage, recipe)  # checks the folder exists and its shapes match
        mesh_cfg = stage.mesh or recipe.mesh
        if num_devices is None and -1 in mesh_cfg.shape:
            raise UserError(f"{where}: mesh {mesh_cfg.spec()} has a -1 axis; give the device count (--devices)")
        mesh = mesh_cfg.resolve(num_devices if num_devices is not None else math.prod(mesh_cfg.shape))
        model = recipe.model.replace(rope_theta=theta, max_position_embeddings=stage.seq_len,
                                     remat=stage.remat or recipe.model.remat)
        _check_stage(where, stage, model, mesh)
        plans.append(StagePlan(index, stage, model, mesh, theta_pending=pending))
        prev_theta, prev_len = theta, stage.seq_len
    return plans


def _check_stage(where: str, stage: StageConfig, model: ModelConfig, mesh: MeshConfig) -> None:
    data_ways = mesh.dp * mesh.fsdp
    if stage.batch_size % data_ways:
        raise UserError(f"{where}.batch_size={stage.batch_size} must be divisible by dp*fsdp={data_ways} "
                        f"(mesh {mesh.spec()}); the global batch per step is batch_size*grad_accum")
    rows = stage.theta_sweep.sequences
    if stage.rope_theta == "sweep" and rows and rows % data_ways:
        raise UserError(f"{where}.theta_sweep.sequences={rows} must be divisible by dp*fsdp={data_ways}")
    if model.num_heads % mesh.tp or model.num_kv_heads % mesh.tp:
        raise UserError(f"{where}: num_heads={model.num_heads} and num_kv_heads={model.num_kv_heads} must be "
                        f"divisible by tp={mesh.tp}")
    if model.attention == "ring":
        from lwm_jax.attention.ring import ring_block

        ring_block(stage.seq_len, mesh.sp, model.attention_block_size)
    elif stage.seq_len % mesh.sp:
        raise UserError(f"{where}.seq_len={stage.seq_len} must be divisible by sp={mesh.sp}")


def _check_data(recipe: RecipeConfig, plan: StagePlan) -> None:
    """The stage's prepared data exists, matches its seq_len, and its token ids fit the model's vocab."""
    from lwm_jax.data.manifest import load_manifest
    from lwm_jax.data.pipeline import load_prepared

    load_prepared(recipe.data, plan.stage.seq_len)
    for directory in recipe.data.resolved_paths(plan.stage.seq_len):
        vocab = load_manifest(directory)["tokenizer"]["vocab_size"]
        if vocab > plan.model.vocab_size:
            raise UserError(f"prepared dataset {directory} uses a tokenizer with {vocab} ids but the model's "
                            f"vocab_size is {plan.model.vocab_size}")


# How a model runs, not what it computes: a run may resume with another remat policy or kernel.
_HOW_IT_RUNS = ("scan_layers", "remat", "attention", "attention_block_size", "attention_kernel")


def _explicit(obj) -> Any:
    """Plain data of a config with every field left at its default dropped (recursively), so a
    field added to the configs later, with a default, does not change an existing fingerprint."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            default = (field.default if field.default is not dataclasses.MISSING else
                       field.default_factory() if field.default_factory is not dataclasses.MISSING else
                       dataclasses.MISSING)
            if value != default:
                out[field.name] = _explicit(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [_explicit(x) for x in obj]
    return obj


def recipe_fingerprint(recipe: RecipeConfig) -> str:
    """Hash of what the recipe computes. Meshes, remat, attention path and kernel are left out, so
    a run may resume on another mesh or with another policy; defaults are left out too."""
    plain = lambda x: {k: v for k, v in _explicit(x).items() if k not in ("mesh", "remat", *_HOW_IT_RUNS)}
    data = plain(dataclasses.replace(recipe, data=None))
    data["model"] = plain(recipe.model)
    data["stages"] = [plain(stage) for stage in recipe.stages]
    data["data"] = _explicit(recipe.data) if recipe.data is not None else None
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def prepare_workdir(workdir: Path, recipe: RecipeConfig) -> None:
    """Creates the workdir, or checks that an existing one was made by this same recipe.

    Process 0 checks and writes `recipe.json`; the others wait for it at a barrier.
    """
    marker = workdir / "recipe.json"
    fingerprint = recipe_fingerprint(recipe)
    if jax.process_index() == 0:
        if marker.is_file():
            saved = json.loads(marker.read_text())
            if saved.get("fingerprint") != fingerprint:
                raise UserError(f"workdir {workdir} was made by a different recipe ({saved.get('name')!r}, "
                                f"fingerprint {saved.get('fingerprint')} vs {fingerprint}); use another --workdir")
        elif workdir.exists() and any(workdir.iterdir()):
            raise UserError(f"workdir {workdir} is not empty and holds no recipe.json; use another --workdir")
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            data = to_dict(dataclasses.replace(recipe, data=None))
            data["data"] = to_dict(recipe.data) if recipe.data is not None else None
            marker.write_text(json.dumps({"name": recipe.name, "fingerprint": fingerprint, "recipe": data},
                                         indent=2))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lwm-jax workdir ready")


class _Preemption:
    """Turns SIGTERM into a flag checked between steps (save, then exit)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)
        return False


def _stage_dir(workdir: Path, name: str) -> Path:
    return workdir / "stages" / name


def _local_batch(batch: dict[str, np.ndarray], plan: StagePlan) -> dict[str, np.ndarray]:
    """Per-process `[A*B_local, seq+1]` examples -> `[A, B_local, seq]` train arrays (zigzag for ring)."""
    from lwm_jax.data.packing import split_inputs_targets

    arrays = split_inputs_targets(batch)
    accum = plan.stage.grad_accum
    arrays = {k: v.reshape(accum, v.shape[0] // accum, v.shape[1]) for k, v in arrays.items()}
    if plan.model.attention == "ring":
        from lwm_jax.attention.layout import to_zigzag

        arrays = {k: to_zigzag(v, plan.mesh.sp, axis=-1) for k, v in arrays.items()}
    return arrays


def _global_batch(local: dict[str, np.ndarray], sharding, plan: StagePlan) -> dict[str, jax.Array]:
    """Global `[A, B, seq]` arrays from this process's rows (all of seq, its share of B)."""
    shape = (plan.stage.grad_accum, plan.stage.batch_size, plan.stage.seq_len)
    return {k: jax.make_array_from_process_local_data(sharding, v, shape) for k, v in local.items()}


def _param_l2(params) -> float:
    """L2 norm of all params (per-array sums on device, total in float64 on the host)."""
    sums = jax.jit(lambda tree: [jax.numpy.sum(jax.numpy.square(x)) for x in jax.tree.leaves(tree)])(params)
    return float(math.sqrt(sum(float(x) for x in jax.device_get(sums))))


def _initial_params(plan: StagePlan, recipe: RecipeConfig, workdir: Path, mesh):
    from lwm_jax.train.checkpoint import restore_params
    from lwm_jax.train.step import init_params

    stage = plan.stage
    kind, _, target = stage.init_from.partition(":")
    if stage.init_from == "previous":
        previous = recipe.stages[plan.index - 1].name
        final = _stage_dir(workdir, previous) / FINAL_FILE
        if not final.is_file():
            raise UserError(f"stage {stage.name} starts from stage {previous}, which has not finished "
                            f"(no {final}); run it first or drop --stage")
        return restore_params(_stage_dir(workdir, previous) / "checkpoints", plan.model, mesh,
                              step=json.loads(final.read_text())["step"])
    if kind == "hf":
        from flax import nnx

        from lwm_jax.convert.hf import import_hf
        from lwm_jax.train.checkpoint import RUNTIME_FIELDS

        runtime = {f: getattr(plan.model, f) for f in RUNTIME_FIELDS}
        return nnx.to_pure_dict(nnx.state(import_hf(target, mesh=mesh, **runtime)))
    if kind == "ckpt":
        return restore_params(target, plan.model, mesh)
    return init_params(plan.model, recipe.seed + plan.index, mesh)


def _swept_thetas(workdir: Path, recipe: RecipeConfig) -> dict[str, float]:
    """Thetas already found by the `rope_theta: sweep` stages of an earlier run in this workdir."""
    found = {}
    for stage in recipe.stages:
        result = _stage_dir(workdir, stage.name) / SWEEP_DIR / "theta_sweep.json"
        if stage.rope_theta == "sweep" and result.is_file():
            found[stage.name] = float(json.loads(result.read_text())["best_theta"])
    return found


def sweep_stage_theta(plan: StagePlan, plans: list[StagePlan], recipe: RecipeConfig, workdir: Path):
    """Runs a `rope_theta: sweep` stage's theta search from its starting params; returns (theta, params).

    The loss is the mean NLL of the starting params on the first sequences of the stage's own data,
    at thetas log-spaced around the scaling-law value from the starting model's theta and length.
    Process 0 saves the table and curve in the stage folder, so a rerun reuses the same theta.
    """
    from lwm_jax.eval.perplexity import load_eval_data
    from lwm_jax.eval.theta_sweep import save_sweep, sweep_table, theta_sweep
    from lwm_jax.parallel.mesh import make_mesh
    from lwm_jax.train.checkpoint import merge_params

    stage, cfg = plan.stage, plan.stage.theta_sweep
    start = plans[plan.index - 1].model if stage.init_from == "previous" else _init_source(stage, recipe)
    start_model = plan.model.replace(rope_theta=start.rope_theta, max_position_embeddings=start.max_position_embeddings)
    tokens = load_eval_data(recipe.data.resolved_paths(stage.seq_len), stage.seq_len,
                            cfg.sequences or plan.mesh.dp * plan.mesh.fsdp, plan.model.vocab_size)
    mesh = make_mesh(plan.mesh)
    log(f"stage {plan.name}: sweeping theta at {stage.seq_len:,} tokens from theta {start.rope_theta:,.0f} "
        f"(trained at {start.max_position_embeddings:,})")
    with jax.set_mesh(mesh):
        params = _initial_params(plan, recipe, workdir, mesh)
        result = theta_sweep(merge_params(start_model, params), tokens, context=stage.seq_len, num=cfg.num,
                             span=cfg.span, search=cfg.search, iterations=cfg.iterations,
                             orig_context=start.max_position_embeddings, mesh=mesh)
    if jax.process_index() == 0:
        save_sweep(result, _stage_dir(workdir, plan.name) / SWEEP_DIR)
        for line in sweep_table(result):
            log(line)
    return result["best_theta"], params


def run_stage(plan: StagePlan, recipe: RecipeConfig, workdir: Path, writer, profile: tuple[int, int] | None,
              global_step: int, start_params=None) -> tuple[dict[str, Any], int]:
    """Trains one stage to its last step (resuming if it has checkpoints); returns its summary.

    `start_params`: the stage's initial params when the caller already loaded them (theta sweep).
    """
    from lwm_jax.data.pipeline import build_iterator
    from lwm_jax.parallel.distributed import data_share
    from lwm_jax.parallel.mesh import make_mesh
    from lwm_jax.train.checkpoint import TrainCheckpointer, model_metadata, params_target
    from lwm_jax.train.metrics import flops_per_token, peak_flops
    from lwm_jax.train.optimizer import make_optimizer, make_schedule
    from lwm_jax.train.step import build_step

    stage, stage_dir = plan.stage, _stage_dir(workdir, plan.name)
    mesh = make_mesh(plan.mesh)
    opt_cfg = stage.optimizer_config
    tx = make_optimizer(opt_cfg, stage.steps)
    schedule = make_schedule(opt_cfg, stage.steps)
    checkpointer = TrainCheckpointer(stage_dir / "checkpoints", keep=stage.keep_checkpoints,
                                     save_interval=stage.checkpoint_every)
    metadata = model_metadata(plan.model, stage=plan.name, seq_len=stage.seq_len, recipe=recipe.name,
                              recipe_fingerprint=recipe_fingerprint(recipe), seed=recipe.seed)
    peak, peak_source = peak_flops(recipe.peak_tflops)
    flops = flops_per_token(plan.model, stage.seq_len)
    is_main = jax.process_index() == 0

    with jax.set_mesh(mesh):
        fns = build_step(plan.model, tx, mesh, recipe.loss_chunk, document_mask=recipe.data.document_mask)
        share, shares = data_share(fns.batch_sharding, (stage.grad_accum, stage.batch_size, stage.seq_len), 1)
        data_iter = build_iterator(recipe.data, seq_len=stage.seq_len, seed=recipe.seed,
                                   global_batch_size=stage.batch_size * stage.grad_accum,
                                   process_index=share, process_count=shares)
        start = checkpointer.latest_step()
        if start is not None:
            p_target = params_target(plan.model, mesh)
            o_target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                    jax.eval_shape(tx.init, p_target), fns.opt_shardings)
            params, opt_state, _ = checkpointer.restore(start, p_target, o_target, data_iter)
            log(f"stage {plan.name}: resuming at step {start}/{stage.steps}")
            writer.drop_after(plan.name, start)
        else:
            start = 0
            params = start_params if start_params is not None else _initial_params(plan, recipe, workdir, mesh)
            opt_state = fns.init_opt_state(params)
            param_l2 = _param_l2(params)  # a collective: every process computes it
            if is_main:
                stage_dir.mkdir(parents=True, exist_ok=True)
                (stage_dir / START_FILE).write_text(json.dumps({
                    "init_from": stage.init_from, "param_l2": param_l2, "rope_theta": plan.model.rope_theta,
                    "seq_len": stage.seq_len}, indent=2))
        log(f"stage {plan.name}: seq_len {stage.seq_len:,}, theta {plan.model.rope_theta:,.0f}, "
            f"mesh {plan.mesh.spec()}, {stage.steps} steps of {stage.tokens_per_step:,} tokens")

        bad_in_a_row, step_times, losses = 0, [], []
        bar = progress(range(start, stage.steps), desc=f"stage {plan.name}", total=stage.steps - start)
        with _Preemption() as preemption:
            for step in bar:
                if profile and global_step == profile[0]:
                    jax.profiler.start_trace(str(workdir / "profile"))
                tick = time.perf_counter()
                batch = _global_batch(_local_batch(next(data_iter), plan), fns.batch_sharding, plan)
                params, opt_state, metrics = fns.train_step(params, opt_state, batch)
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - tick
                global_step += 1
                if profile and global_step == profile[1]:
                    jax.profiler.stop_trace()
                done = step + 1
                tokens_per_s = stage.tokens_per_step / elapsed
                record = {"stage": plan.name, "step": done, "loss": float(metrics["loss"]),
                          "grad_norm": float(metrics["grad_norm"]), "lr": float(schedule(step)),
                          "tokens_per_s": tokens_per_s,
                          "mfu": tokens_per_s * flops / peak,
                          "trained_tokens": float(metrics["tokens"]), "finite": bool(metrics["finite"]),
                          "step_s": elapsed}
                writer.write(record, global_step)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                if done > start + 1 or start == stage.steps - 1:
                    step_times.append(elapsed)
                losses.append(record["loss"])
                bad_in_a_row = 0 if record["finite"] else bad_in_a_row + 1
                if bad_in_a_row:
                    log(f"stage {plan.name} step {done}: non-finite loss or gradient; update skipped "
                        f"({bad_in_a_row} in a row)")
                if bad_in_a_row >= recipe.max_bad_steps:
                    checkpointer.wait()
                    raise UserError(f"stage {plan.name}: {bad_in_a_row} non-finite steps in a row at step {done}; "
                                    "stopping (lower the learning rate or check the data)")
                final = done == stage.steps
                if final or preemption.requested or checkpointer.should_save(done):
                    checkpointer.save(done, params, opt_state, data_iter, {**metadata, "step": done})
                if preemption.requested and not final:
                    checkpointer.wait()
                    checkpointer.close()
                    log(f"stage {plan.name}: preempted; checkpoint saved at step {done}. "
                        "Rerun the same command to resume.")
                    raise SystemExit(143)
        checkpointer.wait()
        checkpointer.close()
    data_iter.close()
    summary = {"stage": plan.name, "seq_len": stage.seq_len, "rope_theta": plan.model.rope_theta,
               "steps": stage.steps, "step": stage.steps, "final_loss": losses[-1] if losses else None,
               "tokens_per_s": stage.tokens_per_step / statistics.median(step_times) if step_times else None,
               "peak_flops_source": peak_source}
    if is_main:
        (stage_dir / FINAL_FILE).write_text(json.dumps(summary, indent=2))
    return summary, global_step


def train(recipe: RecipeConfig, workdir: str | Path, only_stage: str | None = None,
          profile: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Runs the recipe's stages (or one) in `workdir`; returns one summary per stage."""
    from lwm_jax.train.metrics import MetricsWriter

    workdir = Path(workdir)
    swept = _swept_thetas(workdir, recipe)
    plans = plan_recipe(recipe, jax.device_count(), swept=swept)
    if only_stage is not None:
        recipe.stage(only_stage)
    if recipe.data is None or not recipe.data.paths:
        raise UserError("recipe has no data.paths (prepared datasets from `lwm-jax data prepare`)")
    for plan in plans:
        if only_stage in (None, plan.name):
            _check_data(recipe, plan)  # fails now, not after earlier stages ran
    prepare_workdir(workdir, recipe)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    summaries, global_step = [], 0
    try:
        for index in range(len(plans)):
            plan = plans[index]
            if only_stage not in (None, plan.name):
                continue
            final = _stage_dir(workdir, plan.name) / FINAL_FILE
            if final.is_file():
                log(f"stage {plan.name}: already finished, skipping")
                summaries.append(json.loads(final.read_text()))
                continue
            start_params = None
            if plan.theta_pending:
                swept[plan.name], start_params = sweep_stage_theta(plan, plans, recipe, workdir)
                plans = plan_recipe(recipe, jax.device_count(), swept=swept)  # later rules build on it
                plan = plans[index]
            summary, global_step = run_stage(plan, recipe, workdir, writer, profile, global_step, start_params)
            summaries.append(summary)
    finally:
        writer.close()
    return summaries
