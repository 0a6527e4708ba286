"""DeepSpeed-Ulysses exchange over the mesh's `ulysses` axis, per device (inside `shard_map`).

Before attention an `all_to_all` trades sequence shards for head shards: `[b, S/U, H, D]` on each of
the `U` devices becomes `[b, S, H/U, D]` (its slice of heads, the group's whole sequence), and the
output goes back the same way. Traffic per device stays constant as length and devices grow
together. GQA: KV heads are split like the query heads when there are at least `U` of them;
otherwise each device receives only the one KV head its query heads use (gathered into `U` slots
before the exchange; autodiff's transpose of that gather sums the duplicated heads' gradients).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from lwm_jax.parallel.mesh import ULYSSES


def kv_slots(kv_heads: int, ulysses: int) -> np.ndarray | None:
    """The local KV head each of the `ulysses` devices needs when there are fewer KV heads than
    devices (slot `u` = head `u * kv_heads // ulysses`); None when the heads split evenly."""
    if kv_heads % ulysses == 0:
        return None
    return np.arange(ulysses) * kv_heads // ulysses


def to_heads(x, slots: np.ndarray | None = None):
    """`[b, s, h, d]` (this device's sequence shard, every local head) -> `[b, s*U, h/U, d]` (the
    ulysses group's sequence in shard order, this device's heads); `slots` first picks the KV heads
    each device receives (`kv_slots`)."""
    if slots is not None:
        x = jnp.take(x, jnp.asarray(slots), axis=2)
    return lax.all_to_all(x, ULYSSES, split_axis=2, concat_axis=1, tiled=True)


def to_sequence(x):
    """Inverse of `to_heads` (without slots): `[b, s*U, h/U, d]` -> `[b, s, h, d]`."""
    return lax.all_to_all(x, ULYSSES, split_axis=1, concat_axis=2, tiled=True)


def gather_ids(ids):
    """`[b, s]` positions or segment ids (or None) -> `[b, s*U]`, the group's, in shard order."""
    return None if ids is None else lax.all_gather(ids, ULYSSES, axis=1, tiled=True)
