"""Content digests of arrays, written with every checkpoint and checked when it is read, so bytes
damaged on disk (a flipped block in a compressed chunk) are caught before the values are used.

A digest is two 32-bit sums over an array's bit patterns: their plain sum and their sum weighted
by a hash of each element's position (`_WEIGHT_MUL`, `_WEIGHT_ADD`), both modulo 2**32. Integer
addition modulo 2**32 is exact in any order, so the on-device digest (a reduction XLA may split
over shards and devices) and the host one (numpy, in chunks) agree bit for bit, and a change of any
element changes the pair but with probability about 2**-64.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lwm_jax.errors import UserError

_WEIGHT_MUL = 0x9E3779B1  # odd: position -> weight is a bijection modulo 2**32
_WEIGHT_ADD = 0x7F4A7C15
_HOST_CHUNK = 1 << 24  # elements per numpy pass: bounds the temporaries to ~64 MB
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _bits(x):
    """The array's bit patterns as uint32 (8- and 16-bit types widened)."""
    width = jnp.dtype(x.dtype).itemsize
    if width not in _UINT:
        raise ValueError(f"no digest for {x.dtype} arrays")
    bits = jax.lax.bitcast_convert_type(x, _UINT[width]) if x.dtype != _UINT[width] else x
    return bits.astype(jnp.uint32)


def _array_digest(x) -> jax.Array:
    """`[2]` uint32: (sum of bits, position-weighted sum of bits) modulo 2**32, on device."""
    bits = _bits(jnp.asarray(x))
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(bits.ndim)):  # the row-major position, without reshaping a sharded array
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[dim]
    weight = index * jnp.uint32(_WEIGHT_MUL) + jnp.uint32(_WEIGHT_ADD)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


@jax.jit
def _tree_digests(tree):
    return jax.tree.map(_array_digest, tree)


@jax.jit
def _host_digest(x):
    return _array_digest(jax.device_put(x, jax.memory.Space.Device))


def _in_host_memory(x) -> bool:
    return getattr(getattr(x, "sharding", None), "memory_kind", None) == "pinned_host"


def tree_digests(tree) -> dict[str, list[int]]:
    """`{leaf path: [sum, weighted sum]}` of every array leaf of `tree` (on its devices; every
    process of a multi-host run must call it). Leaves in host memory (offloaded optimizer state)
    are brought to the device one at a time, so no more than one of them is there at once."""
    leaves, treedef = jax.tree.flatten(tree)
    on_host = [_in_host_memory(x) for x in leaves]
    on_device = iter(_tree_digests([x for x, h in zip(leaves, on_host, strict=True) if not h]))
    digests = jax.device_get(treedef.unflatten([_host_digest(x) if h else next(on_device)
                                                for x, h in zip(leaves, on_host, strict=True)]))
    flat = jax.tree_util.tree_flatten_with_path(digests)[0]
    return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(d)] for path, d in flat}


def host_digest(x: np.ndarray) -> list[int]:
    """The digest of a host array, equal to `tree_digests`'s for the same values."""
    x = np.ascontiguousarray(x)
    if x.dtype.itemsize not in _UINT:
        raise ValueError(f"no digest for {x.dtype} arrays")
    bits = x.reshape(-1).view(_UINT[x.dtype.itemsize])
    total = weighted = np.uint32(0)
    with np.errstate(over="ignore"):
        for start in range(0, bits.size, _HOST_CHUNK):
            part = bits[start:start + _HOST_CHUNK].astype(np.uint32)
            index = np.arange(start, start + part.size, dtype=np.uint64).astype(np.uint32)
            weight = index * np.uint32(_WEIGHT_MUL) + np.uint32(_WEIGHT_ADD)
            total = np.uint32(total + part.sum(dtype=np.uint32))
            weighted = np.uint32(weighted + (part * weight).sum(dtype=np.uint32))
    return [int(total), int(weighted)]


def check_digests(found: dict[str, list[int]], expected: dict[str, list[int]] | None, where: str | Path) -> None:
    """A UserError naming the first leaf whose digest differs from the one written with it (no
    check for checkpoints written before digests were)."""
    if expected is None:
        return
    for path, digest in expected.items():
        if found.get(path) != list(digest):
            raise UserError(f"checkpoint {where} is damaged: the content of {path.lstrip('.') or 'the array'} "
                            "differs from what was written (digest mismatch)")
