"""How a batch must be laid out for each attention implementation: the lengths it accepts, the
mesh it needs, the token order (the zigzag layout that balances causal ring attention) and the
sharding of `[batch, seq]` arrays. Callers go through `place` and `padded_length`; none of them
knows the ring's rules.

Zigzag: the sequence is cut into `2*sp` equal chunks and sp shard `r` holds chunks `r` and
`2*sp-1-r`, so every device owns as much early (cheap) as late (expensive) causal work; with a
`ulysses` axis each sp shard is split contiguously over it (the all-to-all regathers it). Tokens,
positions, segment ids and targets are permuted once at the input; outputs read in natural order
(logits, KV caches) come back with `from_layout`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lwm_jax.errors import UserError
from lwm_jax.parallel.mesh import SP, ULYSSES, axis_sizes, logical_to_spec


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def zigzag_indices(seq_len: int, sp: int) -> np.ndarray:
    """The permutation `[seq_len]`: entry `i` is the natural index of the token placed at slot `i`."""
    if sp < 1:
        raise UserError(f"sp={sp} must be a positive integer")
    if seq_len % (2 * sp):
        raise UserError(f"seq_len={seq_len} must be divisible by 2*sp={2 * sp} for the zigzag layout")
    chunk = seq_len // (2 * sp)
    chunks = np.arange(seq_len).reshape(2 * sp, chunk)
    order = [c for r in range(sp) for c in (r, 2 * sp - 1 - r)]
    return chunks[order].reshape(seq_len)


def _take(x, index: np.ndarray, axis: int):
    if isinstance(x, np.ndarray):
        return np.take(x, index, axis=axis)
    return jnp.take(x, jnp.asarray(index), axis=axis)


def to_zigzag(x, sp: int, axis: int = 1):
    """`x` (numpy or jax) with its `axis` reordered from natural order to the zigzag layout."""
    return _take(x, zigzag_indices(x.shape[axis], sp), axis)


def from_zigzag(x, sp: int, axis: int = 1):
    """Inverse of `to_zigzag`: `x` with its `axis` reordered from the zigzag layout to natural order."""
    return _take(x, np.argsort(zigzag_indices(x.shape[axis], sp)), axis)


def _ring_units(sp: int, block_size: int, ulysses: int) -> tuple[int, int, int]:
    """`(short, cutoff, long)`: ring lengths up to `cutoff` are multiples of `short` (one block per
    chunk), longer ones multiples of `long` (chunks of `block_size` blocks); both keep each sp shard
    (two chunks) divisible over `ulysses`."""
    cutoff = 2 * sp * block_size
    return math.lcm(2 * sp, sp * ulysses), cutoff, math.lcm(cutoff, sp * ulysses)


def ring_block(seq_len: int, sp: int, block_size: int, ulysses: int = 1) -> int:
    """The block length the ring uses, `min(block_size, seq_len // (2*sp))`; raises UserError
    unless `seq_len` is a multiple of `2*sp*block` (and, with `ulysses` > 1, each sp shard of
    `seq_len // sp` tokens splits evenly over `ulysses`), naming the nearest lengths that are."""
    chunk = seq_len // (2 * sp)
    block = min(block_size, chunk)
    ring_ok = block >= 1 and seq_len % (2 * sp * block) == 0 and chunk % block == 0
    if ring_ok and seq_len % (sp * ulysses) == 0:
        return block
    up = padded_length(seq_len, "ring", sp, block_size, ulysses=ulysses)
    short, cutoff, long = _ring_units(sp, block_size, ulysses)
    unit = long if seq_len > cutoff else short
    below = (seq_len - 1) // unit * unit
    nearest = f"{below:,} or {up:,}" if below > 0 else f"{up:,}"
    if ring_ok:
        raise UserError(f"seq_len={seq_len} must be divisible by sp*ulysses={sp * ulysses} (sp={sp}, "
                        f"ulysses={ulysses}: each sp shard splits evenly over ulysses); "
                        f"the nearest valid lengths are {nearest}")
    raise UserError(
        f"seq_len={seq_len} must be divisible by 2*sp*block={2 * sp * max(block, 1)} "
        f"(sp={sp}, block=min(block_size={block_size}, seq_len//(2*sp)={chunk})={block}); "
        f"the nearest valid lengths are {nearest}")


def padded_length(seq_len: int, impl: str, sp: int = 1, block_size: int = 512, quantum: int = 1,
                  ulysses: int = 1) -> int:
    """The smallest length >= `seq_len` that `impl` accepts with the sequence over `sp` (and
    `ulysses`) devices.

    `ring`: a multiple of `2*sp*block` with `block = min(block_size, len // (2*sp))` and of
    `sp*ulysses`; `blockwise`: at most one block, or a multiple of it; every implementation: a
    multiple of `sp*ulysses`. `quantum` rounds short lengths up further (to `quantum` per chunk) so
    that nearby lengths share a compile.
    """
    shards = sp * ulysses
    if impl == "ring":
        short, cutoff, long = _ring_units(sp, block_size, ulysses)
        n = _round_up(seq_len, math.lcm(short, 2 * sp * quantum))
        return n if n <= cutoff else _round_up(seq_len, long)
    n = _round_up(seq_len, shards * quantum)
    if impl == "blockwise" and n > block_size:
        return _round_up(seq_len, math.lcm(block_size, shards))
    return n


def layout_length(seq_len: int, impl: str, mesh, block_size: int = 512, quantum: int = 1) -> int:
    """The smallest length >= `seq_len` that `impl` accepts on `mesh` (None: one device): what a
    caller pads a sequence of any length to before `place` (the padding masked, never scored)."""
    sizes = axis_sizes(mesh)
    return padded_length(seq_len, impl, sizes[SP], block_size, quantum, ulysses=sizes[ULYSSES])


def check_mesh(impl: str, mesh) -> None:
    """Raises UserError when `impl` cannot run on `mesh` (a `Mesh`, an abstract mesh or None)."""
    if impl != "ring":
        return
    if mesh is None or mesh.empty or not {SP, ULYSSES} & set(mesh.axis_names):
        where = "no mesh is set" if mesh is None or mesh.empty else f"the mesh has axes {mesh.axis_names}"
        raise UserError(f"attention='ring' needs a device mesh with an 'sp' axis ({where}) or a 'ulysses' axis; "
                        "give one (e.g. --mesh sp=4, --mesh ulysses=2,sp=4, or "
                        "`jax.set_mesh(make_mesh(MeshConfig(sp=...)))`) or use 'blockwise'")


def check_heads(q_heads: int, kv_heads: int, tp: int = 1, ulysses: int = 1) -> None:
    """Raises UserError unless the heads split over `tp` and then over `ulysses`: the query heads
    of a tp shard evenly, its KV heads either evenly (at least as many as `ulysses`) or as whole
    heads shared by the ulysses devices (`ulysses` a multiple of them: each device gets the one KV
    head its query heads use)."""
    if q_heads % kv_heads:
        raise UserError(f"q_heads={q_heads} must be divisible by kv_heads={kv_heads}")
    if kv_heads % tp:
        raise UserError(f"kv_heads={kv_heads} must be divisible by tp={tp} (ring attention shards the heads over tp)")
    q_local, kv_local = q_heads // tp, kv_heads // tp
    if q_local % ulysses:
        raise UserError(f"q_heads={q_heads} must be divisible by tp*ulysses={tp * ulysses} (tp={tp}, "
                        f"ulysses={ulysses}: Ulysses trades sequence shards for query-head shards)")
    if kv_local % ulysses and ulysses % kv_local:
        raise UserError(f"kv_heads/tp={kv_local} (kv_heads={kv_heads}, tp={tp}) must divide or be a multiple "
                        f"of ulysses={ulysses} (KV heads are split over ulysses, or each device gets the "
                        "one its query heads use)")


def sp_size(mesh) -> int:
    """The size of the mesh's `sp` axis (1 without a mesh or the axis): the zigzag layout's."""
    return axis_sizes(mesh)[SP]


def to_layout(x, impl: str, sp: int, axis: int = 1):
    """`x` reordered along `axis` from natural order to the order `impl` expects."""
    return to_zigzag(x, sp, axis) if impl == "ring" else x


def from_layout(x, impl: str, sp: int, axis: int = 1):
    """Inverse of `to_layout`: natural order along `axis`."""
    return from_zigzag(x, sp, axis) if impl == "ring" else x


def place(arrays, impl: str, mesh, axis: int = 1):
    """`[..., batch, seq, ...]` numpy arrays (a tuple, list or dict; `seq` at `axis`, batch just before
    it) in the token order of `impl` and, with a mesh, on it with batch over the data axes and seq
    over `sp` and `ulysses` (the logical `length`). A tuple/list/dict comes back as the same kind."""
    sp = sp_size(mesh)
    items = arrays.items() if isinstance(arrays, dict) else enumerate(arrays)

    def one(x):
        x = to_layout(np.ascontiguousarray(x), impl, sp, axis)
        if mesh is None:
            return x
        spec = P(*(None,) * (axis - 1), *logical_to_spec(("batch", "length"), mesh))
        return jax.device_put(x, NamedSharding(mesh, spec))

    placed = {k: one(x) for k, x in items}
    if isinstance(arrays, dict):
        return placed
    return type(arrays)(placed[i] for i in range(len(arrays)))
