"""Mean next-token negative log-likelihood of a checkpoint on given token sequences.

Runs the model over the whole `[batch, seq]` array at once (sharded over the mesh when one is
given, in the zigzag layout for ring attention) and reduces with the chunked loss, so the logits
of a long sequence are never materialised.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from lwm_jax.errors import UserError
from lwm_jax.model.llama import Llama
from lwm_jax.parallel.mesh import logical_to_spec
from lwm_jax.train.loss import chunked_cross_entropy


def load_tokens(path: str | Path, vocab_size: int) -> np.ndarray:
    """Reads int token ids `[batch, seq]` from a `.npy` file, checking them against the vocab."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"token file {path} does not exist")
    try:
        tokens = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise UserError(f"{path} is not a plain .npy array: {err}") from None
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise UserError(f"{path} must hold integer token ids [batch, seq], got {tokens.dtype} {tokens.shape}")
    if tokens.shape[1] < 2:
        raise UserError(f"{path} holds sequences of length {tokens.shape[1]}; need at least 2 tokens")
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        b, s = np.argwhere(bad)[0]
        raise UserError(f"token id {tokens[b, s]} at [{b}, {s}] of {path} is outside the model's vocab "
                        f"[0, {vocab_size})")
    return tokens.astype(np.int32)


def mean_nll(model: Llama, tokens: np.ndarray, mesh=None) -> tuple[float, int]:
    """Returns (mean NLL over all next-token predictions, number of predicted tokens)."""
    batch, seq = tokens.shape
    if mesh is not None:
        data_ways = mesh.shape["dp"] * mesh.shape["fsdp"]
        if batch % data_ways:
            raise UserError(f"batch={batch} is not divisible by dp*fsdp={data_ways} of the mesh")
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
    targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    weights = np.concatenate([np.ones((batch, seq - 1), np.float32), np.zeros((batch, 1), np.float32)], axis=1)
    arrays = (tokens, positions, targets, weights)
    if model.config.attention == "ring":
        from lwm_jax.attention.layout import to_zigzag

        sp = mesh.shape["sp"] if mesh is not None else 1
        arrays = tuple(to_zigzag(a, sp) for a in arrays)
    if mesh is not None:
        sharding = NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh))
        arrays = tuple(jax.device_put(a, sharding) for a in arrays)

    @nnx.jit
    def run(model, tokens, positions, targets, weights):
        hidden = model.hidden(tokens, positions)
        nll, count = chunked_cross_entropy(hidden, model.output_weights(), targets, weights)
        return nll / count

    value = run(model, *arrays)
    return float(value), batch * (seq - 1)
