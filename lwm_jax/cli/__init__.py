"""The `lwm-jax` command: global options (simulated CPU devices, multi-host start-up) and one
sub-command group per module (`convert`, `evaluate`, `generate`, `train`, `data`), each a thin layer
of parsing and printing over one library function per command.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import warnings

import jax

from lwm_jax import __version__
from lwm_jax.cli import convert, data, doctor, evaluate, generate, train
from lwm_jax.errors import UserError
from lwm_jax.parallel.distributed import initialize

GROUPS = (convert, evaluate, generate, train, data, doctor)


def build_parser() -> argparse.ArgumentParser:
    """The global options, then each group's sub-commands (`register(sub)` of every module in GROUPS)."""
    parser = argparse.ArgumentParser(
        prog="lwm-jax",
        description="Extend Llama-3 context to a million tokens: progressive RoPE-theta training "
                    "with ring attention on JAX.")
    parser.add_argument("--version", action="version", version=f"lwm-jax {__version__} (jax {jax.__version__})")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own log lines (absl/orbax, asyncio, tensorboardX), hidden by default")
    parser.add_argument("--cpu-devices", type=int, metavar="N",
                        help="simulate N CPU devices (for meshes on a laptop); set before JAX starts")
    group = parser.add_argument_group("multi-host (one process per host; TPU VMs and SLURM are detected)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
    group.add_argument("--num-processes", type=int, metavar="N", help="number of processes in the run")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    group.add_argument("--heartbeat-timeout", type=int, default=60, metavar="S",
                       help="exit with an error when another process is silent this long (default 60)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in GROUPS:
        module.register(sub)
    return parser


def set_cpu_devices(n: int) -> None:
    """Makes JAX simulate `n` CPU devices; JAX refuses if its backends already started."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as err:
        raise UserError(f"--cpu-devices must be applied before JAX initialises ({err})") from None


def _read_echo(kind, value, tb) -> bool:
    """True for the after-echoes of a failed checkpoint read: orbax's event loop closing under
    tensorstore's pending callbacks, or one of orbax's sibling read coroutines whose own failure of
    the same damaged file nobody awaited any more (the first failure is reported as one line)."""
    if kind is RuntimeError and str(value) == "Event loop is closed":
        return True
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in tb.tb_frame.f_code.co_filename


def quiet_read_echoes() -> None:
    """When a damaged checkpoint fails a read, orbax's unfinished sibling reads and tensorstore's
    pending callbacks print tracebacks of the same failure later, from other threads or the garbage
    collector (`sys.excepthook`, `sys.unraisablehook`). The failure itself is reported as one line;
    these echoes are dropped, every other exception still prints."""
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def on_exception(kind, value, tb):
        if not _read_echo(kind, value, tb):
            excepthook(kind, value, tb)

    def on_unraisable(info):
        if not _read_echo(info.exc_type, info.exc_value, info.exc_traceback):
            unraisablehook(info)

    sys.excepthook, sys.unraisablehook = on_exception, on_unraisable


NOISY_LOGGERS = ("absl", "asyncio", "tensorboardX")  # orbax logs through absl


def quiet_libraries(verbose: bool) -> None:
    """Keeps the libraries' log lines off stderr unless `verbose`: absl's (orbax's warnings, and the
    tracebacks its background threads log when a checkpoint write fails, which the command reports
    as one line), asyncio's "exception was never retrieved" echoes of the same failures, and
    tensorboardX's NaN warnings. Critical messages still print."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.CRITICAL)
    if not verbose:
        warnings.filterwarnings("ignore", module=r"tensorboardX(\.|$)")


def main(argv: list[str] | None = None) -> int:
    """Parses `argv`, applies the global options and runs the command; `UserError` -> one
    `lwm-jax: error: ...` line on stderr and exit code 2."""
    quiet_read_echoes()
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries(args.verbose)
    try:
        if args.cpu_devices is not None:
            if args.cpu_devices < 1:
                raise UserError(f"--cpu-devices={args.cpu_devices} must be >= 1")
            set_cpu_devices(args.cpu_devices)
        initialize(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)
        return args.func(args)
    except UserError as err:
        print(f"lwm-jax: error: {err}", file=sys.stderr)
        return 2
    finally:
        # What a failed command left in reference cycles (a half-read checkpoint's orbax manager) is
        # finalized now, while JAX runs: at interpreter exit its close would start JAX's backends
        # again after their atexit shutdown, and a thread started then never runs (a hang).
        gc.collect()
