"""Accelerator slices to compile for on a host that has none: TPU topologies, whose devices libtpu
describes without a TPU (`jax.experimental.topologies`), so XLA:TPU compiles the real train step
here and says what it needs per chip (the `tpu` extra installs libtpu).

Target names count chips, the JAX devices a mesh is made of: `v5p-8` is 8 chips (`v5:2x2x2`).
Google's accelerator types count TensorCores for v4 and v5p (two per chip), so Google's v5p-16
is lwm-jax's v5p-8; for v5e and v6e the two agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from lwm_jax.config import MESH_AXES, MeshConfig
from lwm_jax.errors import UserError
from lwm_jax.hardware import Hardware, get_hardware


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice: its hardware entry, chips, and libtpu's topology description."""

    name: str
    hardware: str  # the `lwm_jax.hardware` entry
    topology: str  # libtpu's topology name, e.g. "v5:2x2x2"
    chip_config: str = "default"  # "megacore" (v4, v5p: one device per chip) or "default"
    host_bounds: tuple[int, int, int] = (2, 2, 1)  # chips per host along each axis

    @property
    def chips(self) -> int:
        return int(np.prod([int(n) for n in self.topology.split(":")[1].split("x")]))


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("v4-1", "TPU v4", "v4:1x1x1", "megacore", (1, 1, 1)),
    Target("v4-8", "TPU v4", "v4:2x2x2", "megacore"),
    Target("v5e-1", "TPU v5e", "v5e:1x1", host_bounds=(1, 1, 1)),
    Target("v5e-8", "TPU v5e", "v5e:2x4"),
    Target("v5p-1", "TPU v5p", "v5:1x1x1", "megacore", (1, 1, 1)),
    Target("v5p-4", "TPU v5p", "v5:2x2x1", "megacore"),
    Target("v5p-8", "TPU v5p", "v5:2x2x2", "megacore"),
    Target("v5p-64", "TPU v5p", "v5:4x4x4", "megacore"),
    Target("v6e-1", "TPU v6e", "v6e:1x1", host_bounds=(1, 1, 1)),
    Target("v6e-8", "TPU v6e", "v6e:2x4"),
)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"--target {name!r} is not one of {', '.join(TARGETS)} (the number counts chips)")
    return TARGETS[name]


def target_hardware(target: Target) -> Hardware:
    """The hardware table's entry for the target's chips."""
    return get_hardware(target.hardware)


def require_libtpu() -> None:
    """A UserError saying what to install when libtpu (XLA:TPU's compiler) is missing."""
    if importlib.util.find_spec("libtpu") is None:
        raise UserError("compiling for a TPU target needs libtpu: pip install -e '.[tpu]' (jax[tpu] brings it; "
                        "no TPU is needed)")


@contextlib.contextmanager
def _libtpu_env():
    """While libtpu loads: the host's name, so it does not warn about the TPU VM it is not on, and
    leave for a second libtpu in the process (another target). Restored after, since the first
    variable also says "TPU VM" to the multi-host start-up (`parallel.distributed`)."""
    saved = {k: os.environ.get(k) for k in ("TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD")}
    os.environ.update(TPU_WORKER_HOSTNAMES="localhost", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def target_mesh(target: Target, mesh: MeshConfig) -> Mesh:
    """A mesh of the target's compile-only devices in the stage's mesh shape, ordered along the
    chips' links where JAX knows the topology."""
    require_libtpu()
    from jax.experimental import mesh_utils, topologies

    with _libtpu_env():
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology, chip_config_name=target.chip_config,
            chips_per_host_bounds=target.host_bounds, num_slices=1, wrap=(False,) * 3)
    devices = desc.devices
    resolved = mesh.resolve(len(devices)) if -1 in mesh.shape else mesh
    if int(np.prod(resolved.shape)) != len(devices):
        raise UserError(f"mesh {resolved.spec()} needs {int(np.prod(resolved.shape))} devices; target {target.name} "
                        f"has {len(devices)} chips")
    try:
        grid = mesh_utils.create_device_mesh(resolved.shape, devices)
    except (AssertionError, NotImplementedError, ValueError):  # a shape mesh_utils has no layout for
        grid = np.asarray(devices).reshape(resolved.shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def deviceless_backend() -> None:
    """Keeps JAX's running backend on the CPU (TPUs are only a compile target here), unless the
    process chose its platforms already."""
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
