"""The `lwm-jax` command: theta values, --help everywhere, --cpu-devices and sharded evaluation."""

import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from lwm_jax.cli import build_parser, main, quiet_read_echoes


def _run(*argv):
    proc = subprocess.run([sys.executable, "-m", "lwm_jax.cli", *argv], capture_output=True, text=True, timeout=300)
    return proc


@pytest.mark.parametrize("argv,theta", [
    (["--context", "1048576"], 3_580_165_449), (["--context", "262144"], 283_461_213),
    (["--context", "1048576", "--method", "ntk"], 69_123_823)])
def test_theta_command(argv, theta, capsys):
    assert main(["theta", *argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert abs(result["theta"] - theta) <= 1 and result["context"] == int(argv[1])


def _all_commands(parser, prefix=()):
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _all_commands(sub, (*prefix, name))


def test_every_command_has_help(capsys):
    commands = list(_all_commands(build_parser()))
    assert ("theta",) in commands and ("eval", "ppl") in commands
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: lwm-jax" in capsys.readouterr().out


def test_console_script_and_cpu_devices(tmp_path, hf_llama):
    hf_dir, _ = hf_llama(num_kv_heads=2)
    tokens = np.random.default_rng(0).integers(0, 256, size=(4, 64))
    np.save(tmp_path / "t.npy", tokens)
    assert _run("import-hf", str(hf_dir), str(tmp_path / "c")).returncode == 0
    single = _run("eval", "ppl", str(tmp_path / "c"), "--tokens", str(tmp_path / "t.npy"), "--json")
    sharded = _run("--cpu-devices", "8", "eval", "ppl", str(tmp_path / "c"), "--tokens", str(tmp_path / "t.npy"),
                   "--mesh", "dp=2,fsdp=2,tp=2", "--json")
    assert single.returncode == 0 and sharded.returncode == 0, sharded.stderr
    a, b = (json.loads(p.stdout.splitlines()[-1])["mean_nll"] for p in (single, sharded))
    assert abs(a - b) <= 1e-5
    bad = _run("--cpu-devices", "4", "eval", "ppl", str(tmp_path / "c"), "--tokens", str(tmp_path / "t.npy"),
               "--mesh", "dp=2,sp=4")
    assert bad.returncode == 2 and "needs 8 devices but 4 are available" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_only_the_echoes_of_a_failed_checkpoint_read_are_dropped(monkeypatch):
    """An exception nobody can handle any more prints, unless it was raised inside orbax's
    checkpoint code (a sibling read of the damaged file) or is the closed-event-loop echo."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(str(info.exc_value)))
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: seen.append(str(value)))
    quiet_read_echoes()
    inside_orbax = compile("def read():\n    raise Exception('sibling read failed')\n",
                           "/site-packages/orbax/checkpoint/_src/serialization.py", "exec")
    scope = {}
    exec(inside_orbax, scope)
    for raise_it in (scope["read"], lambda: (_ for _ in ()).throw(ValueError("ours"))):
        try:
            raise_it()
        except Exception as err:
            sys.unraisablehook(SimpleNamespace(exc_type=type(err), exc_value=err, exc_traceback=err.__traceback__))
            sys.excepthook(type(err), err, err.__traceback__)
    sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
    assert seen == ["ours", "ours"]


@pytest.mark.parametrize("verbose", [False, True])
def test_library_log_lines_only_with_verbose(tmp_path, caplog, verbose):
    """A second Ctrl-C while a checkpoint save is awaited interrupts orbax's wait, which logs the
    KeyboardInterrupt's traceback through absl before re-raising it: hidden unless --verbose."""
    import threading

    import orbax.checkpoint as ocp

    assert main([*(["--verbose"] if verbose else []), "theta", "--context", "1024"]) == 0
    manager = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True))
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave({"a": np.ones(4)})), force=True)
    caplog.clear()

    join, is_alive = threading.Thread.join, threading.Thread.is_alive
    in_main = lambda: threading.current_thread() is threading.main_thread()  # orbax's own threads run on

    def ctrl_c(self, timeout=None):  # Ctrl-C while the main thread waits for the save to finish
        if in_main():
            raise KeyboardInterrupt
        return join(self, timeout)

    threading.Thread.join = ctrl_c
    threading.Thread.is_alive = lambda self: True if in_main() else is_alive(self)  # still saving
    try:
        with pytest.raises(KeyboardInterrupt):
            manager.wait_until_finished()
    finally:
        threading.Thread.join, threading.Thread.is_alive = join, is_alive
        manager.close()
    logged = [r for r in caplog.records if r.name == "absl" and r.exc_info and "wait_until_finished" in r.getMessage()]
    assert bool(logged) == verbose  # under pytest the log goes to its capture; in a run, to stderr
    nan_warning = logging.getLogger("tensorboardX.x2num")  # "NaN or Inf found in input tensor."
    assert nan_warning.isEnabledFor(logging.WARNING) == verbose
    main(["theta", "--context", "1024"])  # quiet again for the tests after this one
