"""The generation loop: prefill the prompt with the model's own forward pass (the ring over `sp`),
then decode one token at a time with the model's cached call (flash-decoding over the
sequence-sharded cache, `attention.decode`), until the new-token budget or a stop id.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from lwm_jax.attention.decode import KVCache, shard_cache
from lwm_jax.attention.layout import from_layout, place
from lwm_jax.errors import UserError
from lwm_jax.generate.cache import CacheSpec, cache_spec
from lwm_jax.generate.sampling import check_sampling, pick_token
from lwm_jax.parallel.mesh import state_shardings, use_mesh


@functools.partial(nnx.jit, static_argnames=("spec", "mesh"))
def _prefill(model, tokens, positions, segment_ids, last, *, spec: CacheSpec, mesh):
    """Logits `[batch, vocab]` at slot `last` of `tokens` and the cache `(k, v)` in natural order.

    `tokens, positions, segment_ids: [batch, prefill_len]` in the layout of the model's attention.
    """
    x, (k, v) = model.forward(tokens, positions, segment_ids, return_kv=True)  # k: [layers, b, prefill, kv, d]
    logits = model.logits(lax.dynamic_index_in_dim(x, last, axis=1, keepdims=False))
    k, v = (from_layout(a, model.config.attention, spec.sp, axis=2) for a in (k, v))
    pad = ((0, 0), (0, 0), (0, spec.cache_len - spec.prefill_len), (0, 0), (0, 0))
    cache = shard_cache(jnp.pad(k, pad), jnp.pad(v, pad), 0, mesh)
    return logits, (cache.k, cache.v)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "greedy", "mesh"))
def _decode(model, cache, logits, start, key, stop_ids, temperature, top_p, *, max_new_tokens: int,
            greedy: bool, mesh):
    """`(tokens [max_new_tokens], count)`: picks a token from `logits`, feeds it at `start + i`,
    until `max_new_tokens` are out or one of `stop_ids` was picked (it is kept). `cache`: the
    prefill's `(k, v)`, sharded over `mesh`'s `sp` axis."""

    def step(token, pos, cache):
        positions = jnp.full(token.shape + (1,), pos, jnp.int32)
        x, cache = model.forward(token[:, None], positions, cache=cache.at(pos))
        return model.logits(x[:, 0]), cache

    def cond(state):
        i, done = state[0], state[1]
        return (i < max_new_tokens) & ~done

    def body(state):
        i, _, logits, cache, out = state
        token = pick_token(logits, jax.random.fold_in(key, i), greedy, temperature, top_p)
        out = out.at[i].set(token[0])
        logits, cache = step(token, start + i, cache)
        return i + 1, jnp.isin(token[0], stop_ids), logits, cache, out

    out = jnp.zeros((max_new_tokens,), jnp.int32)
    state = (jnp.int32(0), jnp.bool_(False), logits, KVCache(*cache, start, mesh), out)
    count, _, _, _, out = lax.while_loop(cond, body, state)
    return out, count


def place_model(model, mesh):
    """The model with its params placed by the logical rules on `mesh` (no copy if they are)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, state_shardings(mesh, state)))


def check_prompt(prompt_ids, vocab_size: int) -> np.ndarray:
    """The prompt as int32 `[len]`, checked against the vocabulary."""
    prompt = np.asarray(prompt_ids)
    if prompt.ndim == 2 and prompt.shape[0] == 1:
        prompt = prompt[0]
    if prompt.ndim != 1 or (prompt.size and not np.issubdtype(prompt.dtype, np.integer)):
        raise UserError(f"a prompt is one sequence of integer token ids, got {prompt.dtype} {prompt.shape}")
    bad = (prompt < 0) | (prompt >= vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"prompt token {int(prompt[i])} at index {i} is outside the model's vocab [0, {vocab_size})")
    return prompt.astype(np.int32)


def generate(model, prompt_ids, *, max_new_tokens: int, greedy: bool = True, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, stop_ids=(), mesh=None,
             device_memory: int | None = None) -> list[int]:
    """The new tokens (a picked stop id included, as `transformers` does) after `prompt_ids`.

    `mesh`: prefill (the ring when the model runs `attention="ring"`) and the KV cache are
    sharded over its `sp` axis; without one everything runs on one device. `device_memory`
    (bytes) overrides the device's own figure in the fits-in-memory check.
    """
    cfg = model.config
    prompt = check_prompt(prompt_ids, cfg.vocab_size)
    check_sampling(greedy, temperature, top_p)
    spec = cache_spec(cfg, len(prompt), max_new_tokens, mesh, device_memory)
    if mesh is not None:
        model = place_model(model, mesh)
    logits, cache = prefill(model, prompt, spec, mesh)
    out, count = decode(model, cache, logits, spec, greedy=greedy, temperature=temperature, top_p=top_p,
                        seed=seed, stop_ids=stop_ids, mesh=mesh)
    return [int(t) for t in np.asarray(out)[: int(count)]]


def prefill(model, prompt: np.ndarray, spec: CacheSpec, mesh=None):
    """`(logits [batch, vocab] at the last prompt token, (cache_k, cache_v))` for an int32 prompt
    `[prompt_len]`; the model's params must already sit on `mesh` (see `generate`).

    The prompt is padded at its end to `spec.prefill_len`, the padding in a segment of its own (id 0;
    the prompt's is 1) so the prompt never attends to it; decoding overwrites the padding's cache
    rows, one position at a time, before it can see them."""
    n, length = spec.prompt_len, spec.prefill_len
    impl = model.config.attention
    tokens = np.zeros((spec.batch, length), np.int32)
    tokens[:, :n] = prompt
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    segment_ids = (positions < n).astype(np.int32)
    tokens, positions, segment_ids = place((tokens, positions, segment_ids), impl, mesh)
    last = int(np.argmax(np.asarray(positions)[0] == n - 1))  # the last prompt token's slot in the layout
    static = dataclasses.replace(spec, prompt_len=0, max_new_tokens=0, bytes_per_device=0)  # shapes only
    with use_mesh(mesh):
        return _prefill(model, tokens, positions, segment_ids, jnp.int32(last), spec=static, mesh=mesh)


def decode(model, cache, logits, spec: CacheSpec, *, greedy: bool = True, temperature: float = 1.0,
           top_p: float = 1.0, seed: int = 0, stop_ids=(), mesh=None):
    """`(tokens [max_new_tokens], count)` on device: the decode loop after `prefill`."""
    stop = jnp.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], jnp.int32)
    return _decode(model, cache, logits, jnp.int32(spec.prompt_len), jax.random.key(seed), stop,
                   jnp.float32(temperature), jnp.float32(top_p), max_new_tokens=spec.max_new_tokens,
                   greedy=bool(greedy), mesh=mesh)


