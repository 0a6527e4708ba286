"""The step loop of one stage: `StageLoop.steps()` yields a `StepInfo` per optimizer step, and each
hook added with `add_hook(fn, every=N)` sees every N-th step and the stage's last.

Metrics, progress, checkpoints, preemption, profiling and the non-finite guard are hooks
(`train.hooks`); the loop itself only feeds batches to the step and times it. A new feature (a
periodic evaluation, another logger) is a new hook, never another branch in the loop body.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One finished optimizer step: where it is, what it measured and the state after it."""

    stage: str
    step: int  # steps done in this stage (1-based)
    steps: int  # the stage's total
    first: int  # the step this run of the stage started from (0, or a resumed checkpoint's)
    global_step: int  # steps done by this run over every stage
    record: dict[str, Any]  # the step's metrics (`StageLoop`'s `measure`): loss, finite, step_s, ...
    params: Any
    opt_state: Any

    @property
    def last(self) -> bool:
        return self.step == self.steps


@dataclasses.dataclass(frozen=True)
class Hook:
    fn: Callable[[StepInfo], None]
    every: int = 1

    def wants(self, info: StepInfo) -> bool:
        return info.step % self.every == 0 or info.last


class StageLoop:
    """Runs `train_step(params, opt_state, batch)` from step `first` to `steps` on `batches()`.

    `measure(step, metrics, seconds) -> dict` turns the step's device metrics (fetched to the host)
    and its wall time into the record hooks read.
    """

    def __init__(self, train_step, batches: Callable[[], Any], measure: Callable[[int, dict, float], dict], *,
                 stage: str, steps: int, first: int, params, opt_state, global_step: int = 0):
        self.train_step, self.batches, self.measure = train_step, batches, measure
        self.stage, self.total, self.first = stage, steps, first
        self.params, self.opt_state, self.global_step = params, opt_state, global_step
        self.hooks: list[Hook] = []

    def add_hook(self, fn: Callable[[StepInfo], None], every: int = 1) -> StageLoop:
        if every < 1:
            raise ValueError(f"hook every={every} must be >= 1")
        self.hooks.append(Hook(fn, every))
        return self

    def steps(self) -> Iterator[StepInfo]:
        for step in range(self.first, self.total):
            tick = time.perf_counter()
            self.params, self.opt_state, metrics = self.train_step(self.params, self.opt_state, self.batches())
            metrics = jax.device_get(metrics)
            self.global_step += 1
            info = StepInfo(self.stage, step + 1, self.total, self.first, self.global_step,
                            self.measure(step, metrics, time.perf_counter() - tick), self.params, self.opt_state)
            for hook in self.hooks:
                if hook.wants(info):
                    hook.fn(info)
            yield info

    def run(self) -> StepInfo | None:
        """Runs every step; the last `StepInfo` (None when the stage had no step left)."""
        last = collections.deque(self.steps(), maxlen=1)
        return last[0] if last else None
