"""The stage runner: schedules and validates a whole recipe against the devices once, then trains each
stage in order, handing the final params of one stage to the next.

A stage starts from the previous stage's final params (or an HF folder, a checkpoint, or scratch)
with a fresh optimizer and its own theta and seq_len; a sweeping stage's theta is resolved where
its starting params are, and the stages after it build on it. A stage is a `StageLoop` whose
metrics, progress, checkpoints, preemption, profiling and non-finite guard are hooks
(`train.hooks`). Rerunning the same command resumes the unfinished stage from its last good
checkpoint, exactly, and skips finished ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lwm_jax.attention.layout import to_layout
from lwm_jax.config import RUN_FIELDS, ModelConfig, RecipeConfig
from lwm_jax.data.packing import split_inputs_targets
from lwm_jax.data.pipeline import build_iterator, make_global_batch
from lwm_jax.errors import UserError
from lwm_jax.model.store import merge_params, model_metadata, restore_params
from lwm_jax.outputs import write_failure
from lwm_jax.parallel.distributed import data_share
from lwm_jax.parallel.mesh import make_mesh
from lwm_jax.progress import log
from lwm_jax.train.checkpoint import TrainCheckpointer
from lwm_jax.train.hooks import (
    NonFiniteGuard,
    Preemption,
    Profile,
    ReportProgress,
    SaveCheckpoints,
    Timings,
    WriteMetrics,
)
from lwm_jax.train.loop import StageLoop, StepInfo
from lwm_jax.train.metrics import MetricsWriter, flops_per_token, peak_flops
from lwm_jax.train.offload import check_host_memory
from lwm_jax.train.optimizer import make_offload, make_optimizer, make_schedule
from lwm_jax.train.schedule import ScheduledStage, check_data, init_source, schedule_recipe, stage_model
from lwm_jax.train.step import build_step, init_params
from lwm_jax.train.workdir import (
    FINAL_FILE,
    START_FILE,
    SWEEP_DIR,
    claim_workdir,
    recipe_fingerprint,
    stage_dir,
    swept_thetas,
)


@dataclasses.dataclass(frozen=True)
class TrainServices:
    """What a stage may need from the units above training, passed in so that train/ never imports
    conversion or evaluation (the CLI passes the real ones).

    `load_hf(hf_dir, mesh, runtime) -> params`: weights of a Hugging Face folder (`init_from: hf:DIR`).
    `sweep_theta(model, tokens, *, context, sweep, orig_context, mesh, out_dir[, param]) -> best value`:
    the loss-by-theta search of a `rope_theta: sweep` stage (or by `param`, a field of the stage's
    `rope`, for `sweep: FIELD`), which also writes its table and curve into `out_dir` (on process 0).
    `after_run(workdir, recipe)`: on process 0 when a run that held the workdir ends (finished,
    stopped or failed), before the lock is released; the CLI draws WORKDIR/loss.png there.
    `step_hooks`: `(fn(StepInfo), every)` pairs added to every stage's loop after the built-in hooks
    (a periodic evaluation, another logger).
    """

    load_hf: Callable[..., dict] | None = None
    sweep_theta: Callable[..., float] | None = None
    after_run: Callable[[Path, RecipeConfig], Any] | None = None
    step_hooks: tuple[tuple[Callable[[StepInfo], None], int], ...] = ()


def _local_batch(batch: dict[str, np.ndarray], plan: ScheduledStage) -> dict[str, np.ndarray]:
    """Per-process `[A*B_local, seq+1]` examples -> `[A, B_local, seq]` train arrays in the token
    order of the model's attention."""
    arrays = split_inputs_targets(batch)
    accum = plan.stage.grad_accum
    arrays = {k: v.reshape(accum, v.shape[0] // accum, v.shape[1]) for k, v in arrays.items()}
    return {k: to_layout(v, plan.model.attention, plan.mesh.sp, axis=-1) for k, v in arrays.items()}


def _param_l2(params) -> float:
    """L2 norm of all params (per-array sums on device, total in float64 on the host)."""
    sums = jax.jit(lambda tree: [jax.numpy.sum(jax.numpy.square(x)) for x in jax.tree.leaves(tree)])(params)
    return float(math.sqrt(sum(float(x) for x in jax.device_get(sums))))


def _initial_params(plan: ScheduledStage, recipe: RecipeConfig, workdir: Path, mesh, services: TrainServices):
    stage = plan.stage
    kind, _, target = stage.init_from.partition(":")
    if stage.init_from == "previous":
        previous = recipe.stages[plan.index - 1].name
        final = stage_dir(workdir, previous) / FINAL_FILE
        if not final.is_file():
            raise UserError(f"stage {stage.name} starts from stage {previous}, which has not finished "
                            f"(no {final}); run it first or drop --stage")
        return restore_params(stage_dir(workdir, previous) / "checkpoints", plan.model, mesh,
                              step=json.loads(final.read_text())["step"])
    if kind == "hf":
        if services.load_hf is None:
            raise UserError(f"stages.{stage.name}.init_from=hf:... needs a Hugging Face loader "
                            "(run it with `lwm-jax train`)")
        return services.load_hf(target, mesh, {f: getattr(plan.model, f) for f in RUN_FIELDS})
    if kind == "ckpt":
        return restore_params(target, plan.model, mesh)
    return init_params(plan.model, recipe.seed + plan.index, mesh)


def sweep_stage_theta(plan: ScheduledStage, start: ModelConfig, recipe: RecipeConfig, workdir: Path,
                      services: TrainServices):
    """Runs a sweeping stage's search from its starting params; returns (the value found, the params).

    `start` is the model the stage starts from. The loss is the mean NLL of the starting params on
    the first sequences of the stage's own data, at thetas log-spaced around the scaling-law value
    from `start`'s theta and length (or at values of the swept RoPE field around the recipe's). The
    search saves its table and curve in the stage folder, so a rerun reuses the same value.
    """
    if services.sweep_theta is None:
        raise UserError(f"stages.{plan.name}.rope_theta=sweep needs a theta search (run it with `lwm-jax train`)")
    stage = plan.stage
    start_model = plan.model.replace(rope_theta=start.rope_theta, max_position_embeddings=start.max_position_embeddings)
    extra = {}
    if stage.swept != "rope_theta":  # a field of the stage's rope, around its recipe value, at the stage's theta
        start_model = plan.model.replace(max_position_embeddings=start.max_position_embeddings)
        extra = {"param": stage.swept}
    mesh = make_mesh(plan.mesh)
    log(f"stage {plan.name}: sweeping {stage.swept} at {stage.seq_len:,} tokens from theta {start.rope_theta:,.0f} "
        f"(trained at {start.max_position_embeddings:,})")
    with jax.set_mesh(mesh):
        params = _initial_params(plan, recipe, workdir, mesh, services)
        value = services.sweep_theta(merge_params(start_model, params), recipe.data.resolved_paths(stage.seq_len),
                                     context=stage.seq_len, sweep=stage.theta_sweep,
                                     sequences=stage.theta_sweep.sequences or plan.mesh.dp * plan.mesh.fsdp,
                                     orig_context=start.max_position_embeddings, mesh=mesh,
                                     out_dir=stage_dir(workdir, plan.name) / SWEEP_DIR, **extra)
    return value, params


def _resume_or_start(plan: ScheduledStage, recipe: RecipeConfig, workdir: Path, writer, services: TrainServices,
                     mesh, tx, fns, checkpointer: TrainCheckpointer, data_iter, start_params):
    """`(start step, params, opt_state)`: the newest readable checkpoint's, or the stage's initial ones."""
    stage, folder = plan.stage, stage_dir(workdir, plan.name)
    if checkpointer.latest_step() is not None:
        p_target, o_target = fns.state_targets(plan.model, tx)
        start, params, opt_state, _ = checkpointer.restore_newest_good(p_target, o_target, data_iter)
        log(f"stage {plan.name}: resuming at step {start}/{stage.steps}")
        writer.drop_after(plan.name, start)
        return start, params, opt_state
    params = start_params if start_params is not None else _initial_params(plan, recipe, workdir, mesh, services)
    param_l2 = _param_l2(params)  # a collective: every process computes it
    params = jax.device_put(params, fns.params_shardings)  # into host memory with optimizer.offload
    opt_state = fns.init_opt_state(params)
    if jax.process_index() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / START_FILE).write_text(json.dumps({
            "init_from": stage.init_from, "param_l2": param_l2, "rope_theta": plan.model.rope_theta,
            "seq_len": stage.seq_len}, indent=2))
    return 0, params, opt_state


def _measure(plan: ScheduledStage, schedule, flops: float, peak: float):
    """The loop's `measure`: a step's record from its device metrics and wall time."""
    stage = plan.stage

    def measure(step: int, metrics: dict, seconds: float) -> dict:
        tokens_per_s = stage.tokens_per_step / seconds
        return {"stage": plan.name, "step": step + 1, "loss": float(metrics["loss"]),
                "grad_norm": float(metrics["grad_norm"]), "lr": float(schedule(step)), "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * flops / peak, "trained_tokens": float(metrics["tokens"]),
                "finite": bool(metrics["finite"]), "step_s": seconds}

    return measure


def run_stage(plan: ScheduledStage, recipe: RecipeConfig, workdir: Path, writer: MetricsWriter, global_step: int,
              services: TrainServices, preemption: Preemption, profile: Profile | None = None,
              start_params=None) -> tuple[dict[str, Any], int]:
    """Trains one stage to its last step (resuming from its newest good checkpoint); returns its
    summary and the run's global step. A signal noted by `preemption` saves the step and exits.

    `start_params`: the stage's initial params when the caller already loaded them (a sweep).
    """
    stage, folder = plan.stage, stage_dir(workdir, plan.name)
    mesh = make_mesh(plan.mesh)
    tx = make_optimizer(stage.optimizer_config, stage.steps)
    offload = make_offload(stage.optimizer_config, stage.steps)
    metadata = model_metadata(plan.model, stage=plan.name, seq_len=stage.seq_len, recipe=recipe.name,
                              recipe_fingerprint=recipe_fingerprint(recipe), seed=recipe.seed)
    peak, peak_source = peak_flops(recipe.peak_tflops)
    measure = _measure(plan, make_schedule(stage.optimizer_config, stage.steps),
                       flops_per_token(plan.model, stage.seq_len), peak)
    checkpointer = TrainCheckpointer(folder / "checkpoints", keep=stage.keep_checkpoints,
                                     save_interval=stage.checkpoint_every)
    data_iter, report, timings = None, None, Timings()
    try:
        with jax.set_mesh(mesh):
            fns = build_step(plan.model, tx, mesh, recipe.loss_chunk, document_mask=recipe.data.document_mask,
                             offload=offload, natural_positions=recipe.data.packing == "continuous")
            shape = (stage.grad_accum, stage.batch_size, stage.seq_len)
            share, shares = data_share(fns.batch_sharding, shape, 1)
            data_iter = build_iterator(recipe.data, seq_len=stage.seq_len, seed=recipe.seed,
                                       global_batch_size=stage.batch_size * stage.grad_accum,
                                       process_index=share, process_count=shares)
            first, params, opt_state = _resume_or_start(plan, recipe, workdir, writer, services, mesh, tx, fns,
                                                        checkpointer, data_iter, start_params)
            log(f"stage {plan.name}: seq_len {stage.seq_len:,}, theta {plan.model.rope_theta:,.0f}, "
                f"mesh {plan.mesh.spec()}, {stage.steps} steps of {stage.tokens_per_step:,} tokens"
                + (", optimizer state in host memory" if offload is not None else ""))

            def batches():
                return make_global_batch(_local_batch(next(data_iter), plan), fns.batch_sharding,
                                         global_batch_size=stage.batch_size, batch_axis=1)

            loop = StageLoop(fns.train_step, batches, measure, stage=plan.name, steps=stage.steps, first=first,
                             params=params, opt_state=opt_state, global_step=global_step)
            guard, report = NonFiniteGuard(plan.name, recipe.max_bad_steps, checkpointer), ReportProgress(
                plan.name, first, stage.steps)
            loop.add_hook(timings).add_hook(WriteMetrics(writer), every=recipe.log_every).add_hook(report)
            loop.add_hook(guard)
            for fn, every in services.step_hooks:
                loop.add_hook(fn, every)
            if profile is not None:
                profile.begin_if_due(global_step)
                loop.add_hook(profile)
            loop.add_hook(SaveCheckpoints(checkpointer, data_iter, metadata, preemption, guard))
            loop.run()
            checkpointer.close()
    except BaseException:
        checkpointer.abort()  # no orbax thread left writing or logging while the error goes up
        raise
    finally:
        if report is not None:
            report.close()
        if data_iter is not None:
            data_iter.close()
    summary = {"stage": plan.name, "seq_len": stage.seq_len, "rope_theta": plan.model.rope_theta,
               "steps": stage.steps, "step": stage.steps, "final_loss": timings.last_loss,
               "tokens_per_s": timings.tokens_per_s(stage.tokens_per_step), "peak_flops_source": peak_source}
    if jax.process_index() == 0:
        (folder / FINAL_FILE).write_text(json.dumps(summary, indent=2))
    return summary, loop.global_step


def _run_stages(recipe: RecipeConfig, workdir: Path, schedule: list[ScheduledStage], swept: dict[str, float],
                only_stage: str | None, profile: Profile | None, services: TrainServices,
                writer: MetricsWriter) -> list[dict[str, Any]]:
    """Runs the scheduled stages in order (or `only_stage`); each stage's model is resolved from the
    one before it, a sweeping stage's once its search ran."""
    summaries, global_step = [], 0
    previous = init_source(recipe.stages[0], recipe)
    with Preemption() as preemption:
        for plan in schedule:
            stage, final = plan.stage, stage_dir(workdir, plan.name) / FINAL_FILE
            plan = dataclasses.replace(plan, model=stage_model(recipe, stage, previous, swept.get(plan.name)))
            if only_stage in (None, plan.name) and final.is_file():
                log(f"stage {plan.name}: already finished, skipping")
                summaries.append(json.loads(final.read_text()))
            elif only_stage in (None, plan.name):
                if summaries and preemption.requested():
                    raise preemption.stop(f"stage {summaries[-1]['stage']} finished; stopped before stage {plan.name}")
                start_params = None
                if stage.swept is not None and plan.name not in swept:
                    start = previous if stage.init_from == "previous" else init_source(stage, recipe)
                    swept[plan.name], start_params = sweep_stage_theta(plan, start, recipe, workdir, services)
                    plan = dataclasses.replace(plan, model=stage_model(recipe, stage, previous, swept[plan.name]))
                summary, global_step = run_stage(plan, recipe, workdir, writer, global_step, services, preemption,
                                                 profile, start_params)
                summaries.append(summary)
            previous = plan.model
    return summaries


def train(recipe: RecipeConfig, workdir: str | Path, only_stage: str | None = None,
          profile: tuple[int, int] | None = None, services: TrainServices = TrainServices()) -> list[dict[str, Any]]:
    """Runs the recipe's stages (or one) in `workdir`; returns one summary per stage run or skipped.

    Every check that can fail on the recipe, devices and data runs before the workdir is checked
    writable, locked and claimed (`claim_workdir`), all before anything compiles; a run that then
    fails before saving anything leaves a new workdir as it found it.
    """
    workdir = Path(workdir)
    swept = swept_thetas(workdir, recipe)
    schedule = schedule_recipe(recipe, jax.device_count(), swept=swept)
    if only_stage is not None:
        recipe.stage(only_stage)
    if recipe.data is None or not recipe.data.paths:
        raise UserError("recipe has no data.paths (prepared datasets from `lwm-jax data prepare`)")
    for plan in schedule:
        if only_stage in (None, plan.name):
            if plan.stage.optimizer_config.offload:
                check_host_memory(jax.devices(), f"stages.{plan.name}.optimizer.offload=true")
            check_data(recipe, plan)  # fails now, not after earlier stages ran
    claim = claim_workdir(workdir, recipe)
    failed, writer = True, None
    try:
        writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
        tracer = Profile(*profile, workdir / "profile") if profile else None
        summaries = _run_stages(recipe, workdir, schedule, swept, only_stage, tracer, services, writer)
        failed = False
    except OSError as err:  # a write into the workdir (metrics, stage files) the system refused
        failure = write_failure(err, workdir.absolute(), workdir.absolute())
        if failure is None:
            raise
        raise failure from err
    finally:
        if writer is not None:
            writer.close()
        try:
            if services.after_run is not None and jax.process_index() == 0:
                services.after_run(workdir, recipe)
        finally:
            claim.release(failed)
    return summaries
