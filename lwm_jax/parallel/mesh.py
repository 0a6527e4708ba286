"""The device mesh (`dp, fsdp, sp, ulysses, tp`) and the logical-axis rules that map names to mesh axes.

Sharding is written once here: modules name their axes logically (`embed`, `heads`, `length`, ...)
and these rules decide which mesh axes carry them. The sequence shards over `sp` (the ring, major)
and `ulysses` (the all-to-all, inside a node); weights shard over `fsdp`, `sp` *and* `ulysses`, so a
sequence-parallel device also holds a slice of the weights.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lwm_jax.config import MESH_AXES, MeshConfig

# Logical axis name -> mesh axes (None: replicated).
LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    # Parameters.
    "vocab": "tp",
    "embed": ("fsdp", "sp", "ulysses"),
    "heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "mlp": "tp",
    "layers": None,
    "norm": None,
    # Activations.
    "batch": ("dp", "fsdp"),
    "length": ("sp", "ulysses"),  # sp major: each sp shard (two zigzag chunks) splits over ulysses
    "act_embed": None,
    "act_heads": "tp",
    "act_kv_heads": "tp",
    "act_mlp": "tp",
    "act_vocab": "tp",
}


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """Builds the 5-axis mesh for `config` (a -1 axis takes the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    resolved = config.resolve(len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(resolved.shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(resolved.shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: tuple[str | None, ...], mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical axis names; mesh axes of size 1 are dropped (cleaner HLO)."""
    spec = []
    used: set[str] = set()
    for name in logical_axes:
        rule = LOGICAL_RULES.get(name) if name is not None else None
        axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


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
