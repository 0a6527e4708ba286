"""Multi-host start-up through JAX's multi-controller runtime (`jax.distributed`).

One process per host (or per GPU) runs the same command. The coordinator comes from explicit
options, or is detected by JAX itself on TPU VMs and under SLURM. CPU processes talk through gloo,
so the same multi-process code is tested on one machine with processes on 127.0.0.1.
"""

from __future__ import annotations

import os

import jax

from lwm_jax.errors import UserError

CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               heartbeat_timeout_s: int = 60) -> bool:
    """Starts `jax.distributed` when asked or when a cluster is detected; returns True if it did.

    A process that stops answering for `heartbeat_timeout_s` makes the others exit with an error
    instead of hanging in a collective.
    """
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if not all(v is not None for v in explicit):
            raise UserError("--coordinator, --num-processes and --process-id must be given together")
        host, sep, port = coordinator.rpartition(":")
        if not (sep and host and port.isdigit()):
            raise UserError(f"--coordinator {coordinator!r} must be HOST:PORT")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process-id {process_id} must be in [0, --num-processes={num_processes})")
        kwargs = {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}
    elif any(name in os.environ for name in CLUSTER_ENV):
        kwargs = {}  # JAX detects TPU VMs, SLURM and Open MPI clusters itself
    else:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes; no effect on GPU/TPU
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s, **kwargs)
    return True


def is_main_process() -> bool:
    """True on the process that writes shared files (logs, metrics, markers)."""
    return jax.process_index() == 0


def data_share(sharding, global_shape: tuple[int, ...], batch_axis: int) -> tuple[int, int]:
    """(share index, share count) of the batch rows this process's devices hold under `sharding`.

    Processes that hold the same rows (e.g. when `sp` spans hosts) get the same share, so they
    read identical data; the data pipeline's `process_index/process_count` take these values.
    """
    rows = set()
    for device, index in sharding.devices_indices_map(global_shape).items():
        if device.process_index == jax.process_index():
            rows.add(index[batch_axis].indices(global_shape[batch_axis])[:2])
    starts = sorted(rows)
    first, last = starts[0][0], starts[-1][1]
    span = last - first
    if sum(b - a for a, b in starts) != span or global_shape[batch_axis] % span:
        raise UserError(f"this process's devices hold batch rows {starts}, not one contiguous equal share; "
                        "order the mesh so data-parallel axes span processes")
    return first // span, global_shape[batch_axis] // span
