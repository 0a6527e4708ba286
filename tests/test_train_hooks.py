"""The stage loop and its hooks without a model: the cadence hooks run at, a hook added beside the
built-in ones, and the non-finite guard with the checkpoint hook (no save during a streak; the stop
names the last good checkpoint)."""

import pytest

from lwm_jax.errors import UserError
from lwm_jax.train.hooks import NonFiniteGuard, Preemption, SaveCheckpoints
from lwm_jax.train.loop import StageLoop


class FakeCheckpointer:
    """Records the steps it was asked to save; `should_save` every `every` steps."""

    directory = "ckpts"

    def __init__(self, every: int):
        self.every, self.saved = every, []

    def should_save(self, step):
        return step % self.every == 0

    def save(self, step, params, opt_state, data_iterator, metadata):
        self.saved.append(step)

    def latest_step(self):
        return self.saved[-1] if self.saved else None

    def close(self):
        pass


def _loop(finite: list[bool], first: int = 0) -> StageLoop:
    """A loop whose step `i` (1-based) reports `finite[i - 1]`; params count the steps."""
    def train_step(params, opt_state, batch):
        return params + 1, opt_state, {"finite": finite[params]}

    def measure(step, metrics, seconds):
        return {"loss": float(step), "finite": bool(metrics["finite"]), "step_s": seconds}

    return StageLoop(train_step, lambda: None, measure, stage="s", steps=len(finite), first=first, params=first,
                     opt_state=None)


def test_hooks_run_at_their_cadence_and_at_the_last_step():
    loop, seen = _loop([True] * 7), {1: [], 3: []}
    loop.add_hook(lambda info: seen[1].append(info.step))
    loop.add_hook(lambda info: seen[3].append(info.step), every=3)
    last = loop.run()
    assert seen == {1: [1, 2, 3, 4, 5, 6, 7], 3: [3, 6, 7]}
    assert (last.step, last.global_step, last.params) == (7, 7, 7)


def test_a_resumed_loop_starts_after_its_first_step():
    loop, seen = _loop([True] * 5, first=3), []
    loop.add_hook(lambda info: seen.append((info.step, info.first)))
    loop.run()
    assert seen == [(4, 3), (5, 3)]


def _guarded(finite: list[bool], every: int, max_bad: int = 3):
    loop, ckpt = _loop(finite), FakeCheckpointer(every)
    guard = NonFiniteGuard("s", max_bad, ckpt)
    loop.add_hook(guard).add_hook(SaveCheckpoints(ckpt, None, {}, Preemption(), guard))
    return loop, ckpt


def test_no_checkpoint_is_saved_during_a_non_finite_streak():
    loop, ckpt = _guarded([True, True, False, False, True, True], every=2)
    loop.run()
    assert ckpt.saved == [2, 6]  # step 4 fell in the streak: not saved; the finite steps after it are


def test_the_guard_stops_and_names_the_last_good_checkpoint():
    loop, ckpt = _guarded([True, True, True, False, False, False, True], every=2)
    with pytest.raises(UserError, match=r"3 non-finite steps in a row at step 6; stopping \(the last good "
                                        r"checkpoint is step 2 in ckpts; rerunning the same command resumes"):
        loop.run()
    assert ckpt.saved == [2]  # steps 4 and 6 were due but in the streak
