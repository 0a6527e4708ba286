"""The device mesh (`dp, fsdp, sp, ulysses, tp`), the one vocabulary of what each axis carries, and
the logical-axis rules that map names to mesh axes.

Sharding is written once here: modules name their axes logically (`embed`, `heads`, `length`, ...)
and these rules decide which mesh axes carry them. The sequence shards over `sp` (the ring, major)
and `ulysses` (the all-to-all, inside a node); weights shard over `fsdp`, `sp` *and* `ulysses`, so a
sequence-parallel device also holds a slice of the weights. Every other module names mesh axes
through the constants below, never by their strings.
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lwm_jax.config import MESH_AXES, MeshConfig

DP, FSDP, SP, ULYSSES, TP = MESH_AXES
BATCH_AXES = (DP, FSDP)  # the batch is split over these
SEQ_AXES = (SP, ULYSSES)  # the sequence: the ring (major) and the all-to-all
WEIGHT_AXES = (FSDP, SP, ULYSSES)  # the weights' embed dimension (FSDP over every non-batch, non-head axis)
HEADS_AXIS = TP  # heads, the MLP's hidden units and the vocabulary

# Logical axis name -> mesh axes (None: replicated).
LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    # Parameters.
    "vocab": HEADS_AXIS,
    "embed": WEIGHT_AXES,
    "heads": HEADS_AXIS,
    "kv_heads": HEADS_AXIS,
    "head_dim": None,
    "mlp": HEADS_AXIS,
    "layers": None,
    "norm": None,
    # Activations.
    "batch": BATCH_AXES,
    "length": SEQ_AXES,  # sp major: each sp shard (two zigzag chunks) splits over ulysses
    "act_embed": None,
    "act_heads": HEADS_AXIS,
    "act_kv_heads": HEADS_AXIS,
    "act_mlp": HEADS_AXIS,
    "act_vocab": HEADS_AXIS,
}


def axis_sizes(mesh=None) -> dict[str, int]:
    """`{axis: size}` for every axis of MESH_AXES (1 where absent) of a `Mesh`, an abstract mesh, a
    `MeshConfig`, or None (no mesh: every axis 1)."""
    if mesh is None:
        sizes = {}
    elif isinstance(mesh, MeshConfig):
        sizes = dict(zip(MESH_AXES, mesh.shape))
    elif getattr(mesh, "empty", False):
        sizes = {}
    else:
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def current_axis_sizes() -> dict[str, int]:
    """`axis_sizes` of the mesh set with `jax.set_mesh` (every axis 1 without one)."""
    return axis_sizes(jax.sharding.get_abstract_mesh())


def mesh_platform() -> str:
    """The platform (`cpu`, `gpu`, `tpu`) of the devices of the mesh set with `jax.set_mesh`, so a
    program lowered for another platform's devices (a TPU topology compiled on a CPU host) makes its
    choices for them; without a mesh, the platform of JAX's first device."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.devices()[0].platform


def seq_shards(mesh=None) -> int:
    """How many ways `mesh` shards the sequence: `sp * ulysses` (1 without a mesh)."""
    sizes = axis_sizes(mesh)
    return math.prod(sizes[a] for a in SEQ_AXES)


def batch_shards(mesh=None) -> int:
    """How many ways `mesh` shards the batch: `dp * fsdp` (1 without a mesh)."""
    sizes = axis_sizes(mesh)
    return math.prod(sizes[a] for a in BATCH_AXES)


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """Builds the 5-axis mesh for `config` (a -1 axis takes the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    resolved = config.resolve(len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(resolved.shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(resolved.shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def use_mesh(mesh):
    """`jax.set_mesh(mesh)`, or a context that sets nothing when `mesh` is None."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def logical_to_spec(logical_axes: tuple[str | None, ...], mesh=None) -> P:
    """PartitionSpec for logical axis names; with a mesh (any kind `axis_sizes` takes), mesh axes
    of size 1 are dropped (cleaner HLO)."""
    spec = []
    used: set[str] = set()
    sizes = axis_sizes(mesh) if mesh is not None else None
    for name in logical_axes:
        rule = LOGICAL_RULES.get(name) if name is not None else None
        axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        if sizes is not None:
            axes = tuple(a for a in axes if sizes[a] > 1)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names) as a tuple."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def shard_count(logical_axes: tuple[str | None, ...], mesh) -> int:
    """How many ways an array with these logical axes is split on `mesh` (the product of its axes' sizes)."""
    sizes = axis_sizes(mesh)
    return math.prod(sizes[a] for entry in logical_to_spec(logical_axes, mesh) for a in spec_axes(entry))


def logical_sharding(mesh: Mesh, logical_axes: tuple[str | None, ...]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh))


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint by logical names under the current mesh; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, mesh))


def state_shardings(mesh: Mesh, state):
    """NamedShardings for an NNX state whose Variables carry `logical_axes` metadata."""
    def one(variable):
        axes = variable.get_metadata().get("logical_axes")
        if axes is None:
            axes = (None,) * np.ndim(variable.get_value())
        return variable.replace(logical_sharding(mesh, axes))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
