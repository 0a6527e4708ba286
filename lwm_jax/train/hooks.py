"""The hooks of the stage loop (`train.loop`), one concern each: metrics, progress, checkpoints with
preemption, the non-finite guard, profiling and the stage summary's timings.
"""

from __future__ import annotations

import dataclasses
import signal
import statistics
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lwm_jax.errors import UserError
from lwm_jax.progress import Counter, log
from lwm_jax.train.checkpoint import TrainCheckpointer
from lwm_jax.train.loop import StepInfo
from lwm_jax.train.metrics import MetricsWriter


class Preemption:
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
        """Logs `message` with the signal's name; the exit to raise (code 128 + the signal)."""
        log(f"{message} after {signal.Signals(self.signum).name}. Rerun the same command to resume.")
        return SystemExit(128 + self.signum)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


@dataclasses.dataclass
class WriteMetrics:
    """Appends each step's record to `metrics.jsonl` and TensorBoard (process 0's writer)."""

    writer: MetricsWriter

    def __call__(self, info: StepInfo) -> None:
        self.writer.write(info.record, info.global_step)


class ReportProgress:
    """The stage's steps on a `Counter` (a bar on a terminal; in a log file a line at least every
    `LOG_EVERY_S`, and on the first, last and every `every`-th step): step, loss, tokens/s, ETA."""

    def __init__(self, stage: str, first: int, steps: int):
        self.stage, self.first, self.steps = stage, first, steps
        self.every = max(1, (steps - first) // 10)
        self.counter = Counter(f"stage {stage}: step", steps, done=first)

    def __call__(self, info: StepInfo) -> None:
        r = info.record
        note = f"loss {r['loss']:.4f}, {r['tokens_per_s']:,.0f} tokens/s"
        done = info.step - self.first
        self.counter.update(1, note, line=done == 1 or done % self.every == 0)
        if info.last:
            self.close()

    def close(self) -> None:
        self.counter.close()


class NonFiniteGuard:
    """Counts non-finite steps in a row (their updates were skipped) and stops the run after
    `max_bad` of them, naming the last good checkpoint, which the rerun resumes from: while a streak
    lasts nothing is saved (`in_streak`), so no checkpoint made from such a step replaces a good one."""

    def __init__(self, stage: str, max_bad: int, checkpointer: TrainCheckpointer):
        self.stage, self.max_bad, self.checkpointer = stage, max_bad, checkpointer
        self.in_a_row = 0

    @property
    def in_streak(self) -> bool:
        return self.in_a_row > 0

    def __call__(self, info: StepInfo) -> None:
        self.in_a_row = 0 if info.record["finite"] else self.in_a_row + 1
        if not self.in_a_row:
            return
        log(f"stage {self.stage} step {info.step}: non-finite loss or gradient; update skipped "
            f"({self.in_a_row} in a row)")
        if self.in_a_row >= self.max_bad:
            good = self.checkpointer.latest_step()
            where = (f"the last good checkpoint is step {good} in {self.checkpointer.directory}; rerunning the same "
                     "command resumes from it" if good is not None else "no checkpoint of this stage was saved")
            raise UserError(f"stage {self.stage}: {self.in_a_row} non-finite steps in a row at step {info.step}; "
                            f"stopping ({where}; if it happens again, lower the learning rate or check the data)")


@dataclasses.dataclass
class SaveCheckpoints:
    """Saves at the stage's cadence, at its last step and when a signal asks (then exits); never
    during a non-finite streak (`NonFiniteGuard.in_streak`)."""

    checkpointer: TrainCheckpointer
    data_iterator: Any
    metadata: dict
    preemption: Preemption
    guard: NonFiniteGuard

    def __call__(self, info: StepInfo) -> None:
        stop = self.preemption.requested()
        due = info.last or stop or self.checkpointer.should_save(info.step)
        if due and not self.guard.in_streak:
            self.checkpointer.save(info.step, info.params, info.opt_state, self.data_iterator,
                                   {**self.metadata, "step": info.step})
        if stop and not info.last:
            self.checkpointer.close()
            saved = "checkpoint saved" if not self.guard.in_streak else "no checkpoint saved (non-finite streak)"
            raise self.preemption.stop(f"stage {info.stage}: {saved} at step {info.step}")


@dataclasses.dataclass
class Profile:
    """A JAX profiler trace of the run's global steps [start, end) in `out_dir`."""

    start: int
    end: int
    out_dir: Path

    def begin_if_due(self, global_step: int) -> None:
        """Starts the trace before the step after `global_step` when that is `start` (call it first)."""
        if global_step == self.start:
            jax.profiler.start_trace(str(self.out_dir))

    def __call__(self, info: StepInfo) -> None:
        if info.global_step == self.end:
            jax.profiler.stop_trace()
        self.begin_if_due(info.global_step)


class Timings:
    """The stage summary's figures: each step's seconds (the first of a run left out: it compiles,
    unless it is the only one) and the last loss."""

    def __init__(self):
        self.seconds: list[float] = []
        self.last_loss: float | None = None

    def __call__(self, info: StepInfo) -> None:
        if info.step > info.first + 1 or info.first == info.steps - 1:
            self.seconds.append(info.record["step_s"])
        self.last_loss = info.record["loss"]

    def tokens_per_s(self, tokens_per_step: int) -> float | None:
        return tokens_per_step / statistics.median(self.seconds) if self.seconds else None
