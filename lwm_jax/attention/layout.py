"""The zigzag token layout that balances causal ring attention, and its inverse.

The sequence is cut into `2*sp` equal chunks and device `r` holds chunks `r` and `2*sp-1-r`, so
every device owns as much early (cheap) as late (expensive) causal work. Tokens, positions,
segment ids and targets are permuted once at the input with `to_zigzag`; outputs that must be read
in natural order (logits) come back with `from_zigzag`.
"""

from __future__ import annotations

import numpy as np

from lwm_jax.errors import UserError


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
    import jax.numpy as jnp

    return jnp.take(x, jnp.asarray(index), axis=axis)


def to_zigzag(x, sp: int, axis: int = 1):
    """`x` (numpy or jax) with its `axis` reordered from natural order to the zigzag layout."""
    return _take(x, zigzag_indices(x.shape[axis], sp), axis)


def from_zigzag(x, sp: int, axis: int = 1):
    """Inverse of `to_zigzag`: `x` with its `axis` reordered from the zigzag layout to natural order."""
    return _take(x, np.argsort(zigzag_indices(x.shape[axis], sp)), axis)
