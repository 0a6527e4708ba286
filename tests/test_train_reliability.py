"""`lwm-jax train` when things go wrong: a damaged newest checkpoint, two runs on one workdir,
Ctrl-C, a start-up failure, a save that fails midway; and the recipe and plan checks (a repeated
stage name, `plan --stage` checking only that stage's mesh)."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from lwm_jax.cli import main
from lwm_jax.config import load_recipe
from lwm_jax.errors import UserError
from lwm_jax.model.store import read_metadata
from lwm_jax.train.lock import WorkdirLock
from tests.conftest import cli_error
from tests.test_train import prepared, write_recipe  # noqa: F401 - `prepared` is a fixture used here

RESUME_TOL = 1e-6  # per-step loss, resumed vs uninterrupted: the same programs on the same data
STEPS = 10  # enough steps that a run is still going when the tests kill, signal or race it
WAIT_S = 300  # bound on every wait for a subprocess to reach a state


def one_stage_recipe(path: Path, data: Path, **stage) -> Path:
    """The small ring-attention recipe of test_train with only its first stage, STEPS steps."""
    write_recipe(path, data)
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"] = [{**recipe["stages"][0], "steps": STEPS, "keep_checkpoints": 2, **stage}]
    path.write_text(yaml.safe_dump(recipe))
    return path


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "lwm_jax.cli", "--cpu-devices", "8", *argv], capture_output=True,
                          text=True, timeout=WAIT_S, env=_env())


def _start(*argv, log: Path):
    return subprocess.Popen([sys.executable, "-m", "lwm_jax.cli", "--cpu-devices", "8", *argv], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))


def _wait_for(condition, proc=None):
    deadline = time.time() + WAIT_S
    while not condition():
        assert time.time() < deadline, "timed out"
        assert proc is None or proc.poll() is None, "the run ended before the state was reached"
        time.sleep(0.02)


def _losses(workdir: Path) -> dict:
    records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return {(r["stage"], r["step"]): r["loss"] for r in records}


def _steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def _assert_same_losses(got: dict, reference: dict):
    assert set(got) == set(reference)
    for key, loss in reference.items():
        assert abs(got[key] - loss) <= RESUME_TOL, key


def damage(step_dir: Path, part: str) -> Path:
    """Damages one part of a checkpoint step (its largest params file cut in half or with 64 random
    bytes written into it, its metadata cut in half, its data-pipeline state overwritten with bytes
    that are not JSON); returns the damaged file."""
    if part.startswith("params"):
        target = max((p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
                     key=lambda p: p.stat().st_size)
        if part == "params":  # the largest params data file, cut in half
            os.truncate(target, target.stat().st_size // 2)
        else:  # 64 random bytes written into its middle: the file still reads, the values are wrong
            with target.open("r+b") as f:
                f.seek(target.stat().st_size // 2)
                f.write(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes())
    elif part == "metadata":
        target = step_dir / "metadata" / "metadata"
        os.truncate(target, target.stat().st_size // 2)
    else:
        target = step_dir / "data" / "process_0-of-1.json"
        target.write_bytes(b"\x00\x17 not grain state {{")
    return target


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared):  # noqa: F811 - the imported fixture
    """(recipe, workdir, losses) of an uninterrupted run of the one-stage recipe."""
    root = tmp_path_factory.mktemp("reference")
    recipe = one_stage_recipe(root / "r.yaml", prepared)
    run = _cli("train", str(recipe), "--workdir", str(root / "w"))
    assert run.returncode == 0, run.stderr
    (root / "train.log").write_text(run.stderr)  # stderr was a pipe, as a cluster's log file is
    losses = _losses(root / "w")
    assert len(losses) == STEPS and all(np.isfinite(v) for v in losses.values())
    return recipe, root / "w", losses


def test_training_writes_a_loss_curve(reference):
    _, workdir, _ = reference
    assert (workdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (workdir / "train.lock").exists()  # released at the end


def test_a_log_file_gets_plain_step_lines(reference):
    """Off a terminal: a plain line on the first step, every tenth of the stage and the last (and at
    least every 30 s), with loss, tokens/s and ETA; no carriage-return bars, no library noise."""
    _, workdir, losses = reference
    log = (workdir.parent / "train.log").read_text()
    steps = [line for line in log.splitlines() if line.startswith("stage base: step ")]
    assert [line.split()[3].rstrip(",") for line in steps] == [f"{n}/{STEPS}" for n in range(1, STEPS + 1)]
    assert all("ETA" in line and "tokens/s" in line and "loss" in line for line in steps)
    assert f"loss {losses[('base', STEPS)]:.4f}" in steps[-1]
    assert "\r" not in log and "WARNING" not in log and "Traceback" not in log


# A damaged newest checkpoint --------------------------------------------------------------------------


def _killed_after_two_checkpoints(recipe: Path, work: Path, log: Path) -> Path:
    """Starts `train RECIPE` in WORK, kills it with -9 once two checkpoints are on disk (the stage
    unfinished); returns the checkpoint folder."""
    ckpt = work / "stages/base/checkpoints"
    proc = _start("train", str(recipe), "--workdir", str(work), log=log)
    _wait_for(lambda: len(_steps(ckpt)) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=WAIT_S)
    assert not (work / "stages/base/final.json").exists()
    return ckpt


def test_killed_run_with_corrupted_newest_checkpoint_resumes_from_the_last_good(tmp_path, reference):
    recipe, _, expected = reference
    work = tmp_path / "w"
    ckpt = _killed_after_two_checkpoints(recipe, work, tmp_path / "first.log")
    newest = _steps(ckpt)[-1]
    damage(ckpt / str(newest), "params")
    resumed = _cli("train", str(recipe), "--workdir", str(work))
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping damaged checkpoint step {newest}" in resumed.stderr and "Traceback" not in resumed.stderr
    assert (work / "stages/base/damaged" / str(newest)).is_dir()  # kept aside for a look, out of orbax's way
    _assert_same_losses(_losses(work), expected)


@pytest.mark.parametrize("part", ["metadata", "data", "params-bytes"])
def test_damaged_newest_step_is_skipped_in_process(tmp_path, reference, capsys, part):
    """Damaged metadata or data-pipeline state in the newest step, on a copy of the finished run with
    its end undone."""
    recipe, done, expected = reference
    work = tmp_path / "w"
    shutil.copytree(done, work)
    (work / "stages/base/final.json").unlink()
    damage(work / f"stages/base/checkpoints/{STEPS}", part)
    capsys.readouterr()
    assert main(["train", str(recipe), "--workdir", str(work)]) == 0
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint step {STEPS}" in err and f"resuming at step {STEPS - 1}/" in err
    _assert_same_losses(_losses(work), expected)


@pytest.mark.parametrize("part", ["params", "metadata", "params-bytes"])
def test_commands_on_a_damaged_checkpoint_print_one_error_line(tmp_path, reference, capsys, part):
    _, done, _ = reference
    ckpt = tmp_path / "ckpt"
    shutil.copytree(done / "stages/base/checkpoints", ckpt)
    damage(ckpt / str(STEPS), part)
    np.save(tmp_path / "prompt.npy", np.arange(1, 9))
    for argv in (["generate", str(ckpt), "--tokens", str(tmp_path / "prompt.npy"), "--max-new-tokens", "2"],
                 ["export-hf", str(ckpt), str(tmp_path / "hf")]):
        err = cli_error(capsys, argv)
        assert f"{ckpt / str(STEPS) / part.split('-')[0]}" in err and "damaged" in err and "Event loop" not in err, err


# Two runs on one workdir ----------------------------------------------------------------------------


def test_second_train_on_a_workdir_is_refused_while_the_first_finishes(tmp_path, reference):
    recipe, _, expected = reference
    work = tmp_path / "w"
    first = _start("train", str(recipe), "--workdir", str(work), log=tmp_path / "first.log")
    _wait_for(lambda: (work / "recipe.json").is_file(), first)  # claimed (the lock comes first)
    first.send_signal(signal.SIGSTOP)  # held where it is, so the second meets it however fast it trains
    try:
        second = _cli("train", str(recipe), "--workdir", str(work))
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert "in use by another `lwm-jax train`" in second.stderr
    assert f"host {socket.gethostname()}, pid {first.pid}" in second.stderr
    assert first.wait(timeout=WAIT_S) == 0, (tmp_path / "first.log").read_text()
    _assert_same_losses(_losses(work), expected)  # each step once, unchanged
    assert len(_steps(work / "stages/base/checkpoints")) == 2  # keep_checkpoints


def test_stale_lock_of_a_dead_process_is_recovered_and_a_held_one_refuses(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    capsys.readouterr()
    with WorkdirLock(tmp_path):
        assert f"recovered a stale lock {tmp_path / 'train.lock'} left by pid {dead.pid}" in capsys.readouterr().err
        assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            WorkdirLock(tmp_path).acquire()  # another open file: flock refuses it as it would another process
    assert not (tmp_path / "train.lock").exists()


# Ctrl-C ------------------------------------------------------------------------------------------


def test_sigint_saves_and_exits_130_then_resumes_exactly(tmp_path, reference):
    recipe, _, expected = reference
    work = tmp_path / "w"
    log = tmp_path / "first.log"
    proc = _start("train", str(recipe), "--workdir", str(work), "--set", "stages.base.checkpoint_every=0", log=log)
    _wait_for(lambda: (work / "metrics.jsonl").is_file() and (work / "metrics.jsonl").read_text().count("\n") >= 1,
              proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=WAIT_S) == 130
    err = log.read_text()
    assert "SIGINT received" in err and "checkpoint saved at step" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    saved = _steps(work / "stages/base/checkpoints")
    assert len(saved) == 1 and saved[0] < STEPS  # saved at the step it was stopped, not at a checkpoint_every
    resumed = _cli("train", str(recipe), "--workdir", str(work), "--set", "stages.base.checkpoint_every=0")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {saved[0]}/" in resumed.stderr
    _assert_same_losses(_losses(work), expected)


# Start-up failures and failed saves ------------------------------------------------------------------


def test_failed_start_up_leaves_the_workdir_unclaimed(tmp_path, reference, capsys):
    """init_from a checkpoint whose params are damaged passes the plan (its metadata reads) and fails
    when loading; the corrected command must not meet a recipe.json of the failed one."""
    recipe, done, _ = reference
    bad = tmp_path / "bad_ckpt"
    shutil.copytree(done / "stages/base/checkpoints", bad)
    for step in _steps(bad):
        damage(bad / str(step), "params")
    err = cli_error(capsys, ["train", str(recipe), "--workdir", str(tmp_path / "w"),
                             "--set", f"stages.base.init_from=ckpt:{bad}"])
    assert "damaged" in err
    assert not (tmp_path / "w").exists()
    (tmp_path / "empty").mkdir()
    cli_error(capsys, ["train", str(recipe), "--workdir", str(tmp_path / "empty"),
                       "--set", f"stages.base.init_from=ckpt:{bad}"])
    assert list((tmp_path / "empty").iterdir()) == []


class _FullDisk:
    """A commit future of a write that ran out of space in orbax's background thread."""

    def result(self, timeout=None):
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("when", ["at-once", "in-background"])
def test_failed_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, reference, capsys, monkeypatch, when):
    """Disk full while step 3 is written: its metadata writer fails after params and optimizer state,
    either as it is called or in the asynchronous commit (found when the next save waits for it)."""
    recipe, _, expected = reference
    work = tmp_path / "w"
    calls = {"n": 0}
    original = ocp.JsonCheckpointHandler.async_save

    async def failing_writer(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 and when == "at-once":
            raise OSError(errno.ENOSPC, "No space left on device")
        futures = await original(self, *args, **kwargs)
        return [*(futures or []), _FullDisk()] if calls["n"] == 3 else futures

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", failing_writer)
    capsys.readouterr()
    assert main(["train", str(recipe), "--workdir", str(work)]) == 2
    out = capsys.readouterr().err
    err = out.strip().splitlines()[-1]  # after the stage's start-up lines (and orbax's log of its thread)
    assert err.startswith("lwm-jax: error: ") and (when != "at-once" or "Traceback" not in out)
    assert "saving checkpoint step 3" in err and "No space left on device" in err
    assert "the previous checkpoint (step 2) is intact" in err
    left = sorted(p.name for p in (work / "stages/base/checkpoints").iterdir())
    assert left == ["1", "2"]  # whole steps only: no 3.orbax-checkpoint-tmp
    monkeypatch.undo()

    assert read_metadata(work / "stages/base/checkpoints")["step"] == 2  # readable, and the newest
    assert main(["train", str(recipe), "--workdir", str(work)]) == 0
    _assert_same_losses(_losses(work), expected)


# Recipe and plan checks -------------------------------------------------------------------------------


def test_duplicate_stage_name_is_reported_as_a_duplicate(tmp_path, prepared):  # noqa: F811
    path = write_recipe(tmp_path / "r.yaml", prepared)
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"][1]["name"] = "base"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match="stage names must be unique; repeated: base"):
        load_recipe(path)


def test_plan_of_one_stage_checks_only_that_stages_mesh(tmp_path, prepared, capsys):  # noqa: F811
    path = write_recipe(tmp_path / "r.yaml", prepared, mesh={"dp": -1, "sp": 2})
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"][1]["mesh"] = {"sp": 8}  # needs 8 devices
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["plan", str(path), "--stage", "base", "--devices", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [s["name"] for s in result["stages"]] == ["base"] and result["stages"][0]["devices"] == 4
    assert "needs 8 devices" in cli_error(capsys, ["plan", str(path), "--stage", "long", "--devices", "4"])


def test_offloaded_run_killed_and_resumed_matches_the_plain_run(tmp_path, reference):
    """`optimizer.offload` on the dp=2, sp=4 ring: killed with -9 once two checkpoints of the host-resident
    state are on disk, rerun, and every step's loss equals the run without offload."""
    _, _, expected = reference
    recipe = yaml.safe_load(reference[0].read_text())
    recipe["stages"][0]["optimizer"] = {"offload": True}
    (recipe_path := tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    work = tmp_path / "w"
    _killed_after_two_checkpoints(recipe_path, work, tmp_path / "first.log")
    assert "optimizer state in host memory" in (tmp_path / "first.log").read_text()
    resumed = _cli("train", str(recipe_path), "--workdir", str(work))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stderr
    _assert_same_losses(_losses(work), expected)
