"""The stage runner: plans and validates a whole recipe against the devices, then trains each stage
in order, handing the final params of one stage to the next.

A stage starts from the previous stage's final params (or an HF folder, a checkpoint, or scratch)
with a fresh optimizer and its own theta and seq_len. Rerunning the same command resumes the
unfinished stage from its last checkpoint, exactly, and skips finished ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lwm_jax.attention.layout import to_layout
from lwm_jax.config import RUN_FIELDS, RecipeConfig
from lwm_jax.data.packing import split_inputs_targets
from lwm_jax.data.pipeline import build_iterator
from lwm_jax.errors import UserError
from lwm_jax.model.store import merge_params, model_metadata, params_target, restore_params
from lwm_jax.parallel.distributed import data_share
from lwm_jax.parallel.mesh import make_mesh
from lwm_jax.progress import log, progress
from lwm_jax.train.checkpoint import TrainCheckpointer
from lwm_jax.train.metrics import MetricsWriter, flops_per_token, peak_flops
from lwm_jax.train.optimizer import make_optimizer, make_schedule
from lwm_jax.train.schedule import ScheduledStage, check_data, init_source, schedule_recipe
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
class TrainHooks:
    """What a stage may need from the units above training, passed in so that train/ never imports
    conversion or evaluation (the CLI passes the real ones).

    `load_hf(hf_dir, mesh, runtime) -> params`: weights of a Hugging Face folder (`init_from: hf:DIR`).
    `sweep_theta(model, tokens, *, context, sweep, orig_context, mesh, out_dir[, param]) -> best value`:
    the loss-by-theta search of a `rope_theta: sweep` stage (or by `param`, a field of the stage's
    `rope`, for `sweep: FIELD`), which also writes its table and curve into `out_dir` (on process 0).
    """

    load_hf: Callable[..., dict] | None = None
    sweep_theta: Callable[..., float] | None = None
    # `after_run(workdir, recipe)`: on process 0 when a run that held the workdir ends (finished,
    # stopped or failed), before the lock is released; the CLI draws WORKDIR/loss.png there.
    after_run: Callable[[Path, RecipeConfig], Any] | None = None


class _Preemption:
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag checked between steps: save, then exit with
    128 + the signal (143, 130). A second Ctrl-C stops at once, without saving (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log(f"{signal.Signals(signum).name} received: saving a checkpoint after this step"
            + (" (Ctrl-C again to stop without saving)" if signum == signal.SIGINT else ""))

    def requested(self) -> bool:
        """Whether any process was signalled (agreed between processes, so all save the same step)."""
        if jax.process_count() == 1:
            return self.signum is not None
        flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
        self.signum = self.signum or int(np.max(flags)) or None
        return self.signum is not None

    def stop(self, message: str) -> SystemExit:
        """Logs `message` with the signal's name; the exit to raise (code 128 + signal)."""
        log(f"{message} after {signal.Signals(self.signum).name}. Rerun the same command to resume.")
        return SystemExit(128 + self.signum)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def _local_batch(batch: dict[str, np.ndarray], plan: ScheduledStage) -> dict[str, np.ndarray]:
    """Per-process `[A*B_local, seq+1]` examples -> `[A, B_local, seq]` train arrays in the token
    order of the model's attention."""
    arrays = split_inputs_targets(batch)
    accum = plan.stage.grad_accum
    arrays = {k: v.reshape(accum, v.shape[0] // accum, v.shape[1]) for k, v in arrays.items()}
    return {k: to_layout(v, plan.model.attention, plan.mesh.sp, axis=-1) for k, v in arrays.items()}


def _global_batch(local: dict[str, np.ndarray], sharding, plan: ScheduledStage) -> dict[str, jax.Array]:
    """Global `[A, B, seq]` arrays from this process's rows (all of seq, its share of B)."""
    shape = (plan.stage.grad_accum, plan.stage.batch_size, plan.stage.seq_len)
    return {k: jax.make_array_from_process_local_data(sharding, v, shape) for k, v in local.items()}


def _param_l2(params) -> float:
    """L2 norm of all params (per-array sums on device, total in float64 on the host)."""
    sums = jax.jit(lambda tree: [jax.numpy.sum(jax.numpy.square(x)) for x in jax.tree.leaves(tree)])(params)
    return float(math.sqrt(sum(float(x) for x in jax.device_get(sums))))


def _initial_params(plan: ScheduledStage, recipe: RecipeConfig, workdir: Path, mesh, hooks: TrainHooks):
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
        if hooks.load_hf is None:
            raise UserError(f"stages.{stage.name}.init_from=hf:... needs a Hugging Face loader "
                            "(run it with `lwm-jax train`)")
        return hooks.load_hf(target, mesh, {f: getattr(plan.model, f) for f in RUN_FIELDS})
    if kind == "ckpt":
        return restore_params(target, plan.model, mesh)
    return init_params(plan.model, recipe.seed + plan.index, mesh)


def sweep_stage_theta(plan: ScheduledStage, plans: list[ScheduledStage], recipe: RecipeConfig, workdir: Path,
                      hooks: TrainHooks):
    """Runs a `rope_theta: sweep` stage's theta search from its starting params; returns (theta, params).

    The loss is the mean NLL of the starting params on the first sequences of the stage's own data,
    at thetas log-spaced around the scaling-law value from the starting model's theta and length.
    The search saves its table and curve in the stage folder, so a rerun reuses the same theta.
    """
    if hooks.sweep_theta is None:
        raise UserError(f"stages.{plan.name}.rope_theta=sweep needs a theta search (run it with `lwm-jax train`)")
    stage = plan.stage
    start = plans[plan.index - 1].model if stage.init_from == "previous" else init_source(stage, recipe)
    start_model = plan.model.replace(rope_theta=start.rope_theta, max_position_embeddings=start.max_position_embeddings)
    extra = {}
    if stage.swept != "rope_theta":  # a field of the stage's rope, around its recipe value, at the stage's theta
        start_model = plan.model.replace(max_position_embeddings=start.max_position_embeddings)
        extra = {"param": stage.swept}
    mesh = make_mesh(plan.mesh)
    log(f"stage {plan.name}: sweeping {stage.swept} at {stage.seq_len:,} tokens from theta {start.rope_theta:,.0f} "
        f"(trained at {start.max_position_embeddings:,})")
    with jax.set_mesh(mesh):
        params = _initial_params(plan, recipe, workdir, mesh, hooks)
        theta = hooks.sweep_theta(merge_params(start_model, params), recipe.data.resolved_paths(stage.seq_len),
                                  context=stage.seq_len, sweep=stage.theta_sweep,
                                  sequences=stage.theta_sweep.sequences or plan.mesh.dp * plan.mesh.fsdp,
                                  orig_context=start.max_position_embeddings, mesh=mesh,
                                  out_dir=stage_dir(workdir, plan.name) / SWEEP_DIR, **extra)
    return theta, params


def _resume_or_start(plan: ScheduledStage, recipe: RecipeConfig, workdir: Path, writer, hooks: TrainHooks, mesh, tx,
                     fns, checkpointer: TrainCheckpointer, data_iter, start_params):
    """`(start step, params, opt_state)`: the newest readable checkpoint's, or the stage's initial ones."""
    stage, folder = plan.stage, stage_dir(workdir, plan.name)
    if checkpointer.latest_step() is not None:
        p_target = params_target(plan.model, mesh)
        o_target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                jax.eval_shape(tx.init, p_target), fns.opt_shardings)
        start, params, opt_state, _ = checkpointer.restore_newest_good(p_target, o_target, data_iter)
        log(f"stage {plan.name}: resuming at step {start}/{stage.steps}")
        writer.drop_after(plan.name, start)
        return start, params, opt_state
    params = start_params if start_params is not None else _initial_params(plan, recipe, workdir, mesh, hooks)
    opt_state = fns.init_opt_state(params)
    param_l2 = _param_l2(params)  # a collective: every process computes it
    if jax.process_index() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / START_FILE).write_text(json.dumps({
            "init_from": stage.init_from, "param_l2": param_l2, "rope_theta": plan.model.rope_theta,
            "seq_len": stage.seq_len}, indent=2))
    return 0, params, opt_state


def run_stage(plan: ScheduledStage, recipe: RecipeConfig, workdir: Path, writer, profile: tuple[int, int] | None,
              global_step: int, hooks: TrainHooks, start_params=None,
              preemption: _Preemption | None = None) -> tuple[dict[str, Any], int]:
    """Trains one stage to its last step (resuming from its newest readable checkpoint); returns its
    summary. A signal noted by `preemption` saves the step and exits.

    `start_params`: the stage's initial params when the caller already loaded them (theta sweep).
    """
    preemption = preemption or _Preemption()
    stage, folder = plan.stage, stage_dir(workdir, plan.name)
    mesh = make_mesh(plan.mesh)
    opt_cfg = stage.optimizer_config
    tx = make_optimizer(opt_cfg, stage.steps)
    schedule = make_schedule(opt_cfg, stage.steps)
    metadata = model_metadata(plan.model, stage=plan.name, seq_len=stage.seq_len, recipe=recipe.name,
                              recipe_fingerprint=recipe_fingerprint(recipe), seed=recipe.seed)
    peak, peak_source = peak_flops(recipe.peak_tflops)
    flops = flops_per_token(plan.model, stage.seq_len)
    checkpointer = TrainCheckpointer(folder / "checkpoints", keep=stage.keep_checkpoints,
                                     save_interval=stage.checkpoint_every)
    data_iter = None
    try:
        with jax.set_mesh(mesh):
            fns = build_step(plan.model, tx, mesh, recipe.loss_chunk, document_mask=recipe.data.document_mask)
            share, shares = data_share(fns.batch_sharding, (stage.grad_accum, stage.batch_size, stage.seq_len), 1)
            data_iter = build_iterator(recipe.data, seq_len=stage.seq_len, seed=recipe.seed,
                                       global_batch_size=stage.batch_size * stage.grad_accum,
                                       process_index=share, process_count=shares)
            start, params, opt_state = _resume_or_start(plan, recipe, workdir, writer, hooks, mesh, tx, fns,
                                                        checkpointer, data_iter, start_params)
            log(f"stage {plan.name}: seq_len {stage.seq_len:,}, theta {plan.model.rope_theta:,.0f}, "
                f"mesh {plan.mesh.spec()}, {stage.steps} steps of {stage.tokens_per_step:,} tokens")

            bad_in_a_row, step_times, losses = 0, [], []
            bar = progress(range(start, stage.steps), desc=f"stage {plan.name}", total=stage.steps - start)
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
                    raise UserError(f"stage {plan.name}: {bad_in_a_row} non-finite steps in a row at step {done}; "
                                    "stopping (lower the learning rate or check the data)")
                final, stop = done == stage.steps, preemption.requested()
                if final or stop or checkpointer.should_save(done):
                    checkpointer.save(done, params, opt_state, data_iter, {**metadata, "step": done})
                if stop and not final:
                    checkpointer.close()
                    raise preemption.stop(f"stage {plan.name}: checkpoint saved at step {done}")
            checkpointer.close()
    except BaseException:
        checkpointer.abort()  # no orbax thread left writing or logging while the error goes up
        raise
    finally:
        if data_iter is not None:
            data_iter.close()
    summary = {"stage": plan.name, "seq_len": stage.seq_len, "rope_theta": plan.model.rope_theta,
               "steps": stage.steps, "step": stage.steps, "final_loss": losses[-1] if losses else None,
               "tokens_per_s": stage.tokens_per_step / statistics.median(step_times) if step_times else None,
               "peak_flops_source": peak_source}
    if jax.process_index() == 0:
        (folder / FINAL_FILE).write_text(json.dumps(summary, indent=2))
    return summary, global_step


def train(recipe: RecipeConfig, workdir: str | Path, only_stage: str | None = None,
          profile: tuple[int, int] | None = None, hooks: TrainHooks = TrainHooks()) -> list[dict[str, Any]]:
    """Runs the recipe's stages (or one) in `workdir`; returns one summary per stage.

    Every check that can fail on the recipe, devices and data runs before the workdir is locked and
    claimed; a run that then fails before saving anything leaves a new workdir as it found it.
    """
    workdir = Path(workdir)
    swept = swept_thetas(workdir, recipe)
    plans = schedule_recipe(recipe, jax.device_count(), swept=swept)
    if only_stage is not None:
        recipe.stage(only_stage)
    if recipe.data is None or not recipe.data.paths:
        raise UserError("recipe has no data.paths (prepared datasets from `lwm-jax data prepare`)")
    for plan in plans:
        if only_stage in (None, plan.name):
            check_data(recipe, plan)  # fails now, not after earlier stages ran
    claim = claim_workdir(workdir, recipe)
    summaries, global_step, failed, writer = [], 0, True, None
    try:
        writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
        with _Preemption() as preemption:
            for index in range(len(plans)):
                plan = plans[index]
                if only_stage not in (None, plan.name):
                    continue
                final = stage_dir(workdir, plan.name) / FINAL_FILE
                if final.is_file():
                    log(f"stage {plan.name}: already finished, skipping")
                    summaries.append(json.loads(final.read_text()))
                    continue
                if summaries and preemption.requested():
                    raise preemption.stop(f"stage {summaries[-1]['stage']} finished; stopped before stage {plan.name}")
                start_params = None
                if plan.theta_pending:
                    swept[plan.name], start_params = sweep_stage_theta(plan, plans, recipe, workdir, hooks)
                    plans = schedule_recipe(recipe, jax.device_count(), swept=swept)  # later rules build on it
                    plan = plans[index]
                summary, global_step = run_stage(plan, recipe, workdir, writer, profile, global_step, hooks,
                                                 start_params, preemption)
                summaries.append(summary)
        failed = False
    finally:
        if writer is not None:
            writer.close()
        try:
            if hooks.after_run is not None and jax.process_index() == 0:
                hooks.after_run(workdir, recipe)
        finally:
            claim.release(failed)
    return summaries
