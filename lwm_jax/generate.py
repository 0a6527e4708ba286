"""KV-cache generation: plan the cache against the mesh, prefill with the model's own forward pass
(the ring over `sp`), then decode one token at a time with the model's cached call (flash-decoding
over the sequence-sharded cache, `attention.decode`), sampling greedily or from the top-p mass.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from lwm_jax.attention.decode import BATCH_AXES, HEADS_AXIS, SP, KVCache, shard_cache
from lwm_jax.attention.layout import check_mesh, from_layout, layout_length, place, seq_shards
from lwm_jax.config import ModelConfig, from_dict
from lwm_jax.data.chat import ChatTemplate
from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info
from lwm_jax.errors import UserError
from lwm_jax.model.context import check_context
from lwm_jax.model.store import load_model, read_metadata
from lwm_jax.parallel.mesh import state_shardings

CACHE_QUANTUM = 128  # cache positions per sp device are rounded up to this (fewer recompiles)
PAD_QUANTUM = 16  # prefill positions per zigzag chunk (per device without the ring) likewise


# Plan ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """Static shapes of one generation: prompt padding, cache length, rows and sharding sizes."""

    prompt_len: int
    max_new_tokens: int
    prefill_len: int  # the prompt padded to what the prefill attention needs
    cache_len: int  # >= prefill_len and prompt_len + max_new_tokens; a multiple of sp*ulysses
    batch: int  # rows: the prompt repeated over dp*fsdp (a mesh shards the batch over them)
    sp: int
    tp: int
    ring: bool
    bytes_per_device: int  # params + cache, the estimate checked against device memory


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def device_memory_bytes(mesh=None) -> int | None:
    """Memory of one device as the runtime reports it (None where it does not, e.g. on CPU)."""
    device = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0])
    try:
        return int(device.memory_stats()["bytes_limit"])
    except Exception:  # CPU and some plugins report nothing
        return None


def plan_cache(config: ModelConfig, prompt_len: int, max_new_tokens: int, mesh=None,
               device_memory: int | None = None) -> CachePlan:
    """Checks a generation against the mesh before anything compiles; raises UserError when the
    prompt is empty, the heads do not divide over tp, or params + cache exceed a device's memory
    (`device_memory` bytes, else what the device reports; unchecked when neither is known)."""
    if prompt_len < 1:
        raise UserError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    sizes = dict(mesh.shape) if mesh is not None else {}
    sp, tp = sizes.get(SP, 1), sizes.get(HEADS_AXIS, 1)
    batch = math.prod(sizes.get(a, 1) for a in BATCH_AXES)
    ring = config.attention == "ring"
    check_mesh(config.attention, mesh)
    if config.num_kv_heads % tp:
        raise UserError(f"kv_heads={config.num_kv_heads} must be divisible by tp={tp} (the KV cache "
                        "shards its heads over tp)")
    prefill = layout_length(prompt_len, config.attention, mesh, config.attention_block_size, PAD_QUANTUM)
    shards = seq_shards(mesh)  # the cache's length axis is over sp and ulysses
    cache_len = _round_up(max(prefill, prompt_len + max_new_tokens), CACHE_QUANTUM * shards)
    itemsize = jnp.dtype(config.dtype).itemsize
    cache_bytes = 2 * config.num_layers * batch * cache_len * config.num_kv_heads * config.head_dim * itemsize
    weight_ways = sizes.get("fsdp", 1) * shards * tp
    per_device = cache_bytes // (shards * tp) // batch + config.num_params * 4 // weight_ways
    limit = device_memory if device_memory is not None else device_memory_bytes(mesh)
    if limit is not None and per_device > limit:
        gib = 2.0**30
        raise UserError(
            f"prompt {prompt_len:,} + {max_new_tokens:,} new tokens need a {cache_len:,}-token KV cache: "
            f"{per_device / gib:.3f} GiB per device with sp={sp}{'' if shards == sp else f', ulysses={shards // sp}'} "
            f"(params and cache), more than the {limit / gib:.3f} GiB a device holds; use a mesh with a larger "
            "sp (or ulysses) or fewer tokens")
    return CachePlan(prompt_len, max_new_tokens, prefill, cache_len, batch, sp, tp, ring, per_device)


# Prefill and decode ----------------------------------------------------------------------------


@functools.partial(nnx.jit, static_argnames=("plan", "mesh"))
def _prefill(model, tokens, positions, segment_ids, last, *, plan: CachePlan, mesh):
    """Logits `[batch, vocab]` at slot `last` of `tokens` and the cache `(k, v)` in natural order.

    `tokens, positions, segment_ids: [batch, prefill_len]` in the layout of the model's attention.
    """
    x, (k, v) = model.forward(tokens, positions, segment_ids, return_kv=True)  # k: [layers, b, prefill, kv, d]
    logits = model.logits(lax.dynamic_index_in_dim(x, last, axis=1, keepdims=False))
    k, v = (from_layout(a, model.config.attention, plan.sp, axis=2) for a in (k, v))
    pad = ((0, 0), (0, 0), (0, plan.cache_len - plan.prefill_len), (0, 0), (0, 0))
    cache = shard_cache(jnp.pad(k, pad), jnp.pad(v, pad), 0, mesh)
    return logits, (cache.k, cache.v)


def _pick(logits, key, greedy: bool, temperature, top_p):
    """Next token `[batch]` from float32 logits `[batch, vocab]`: argmax, or a top-p sample at
    `temperature` (both traced scalars, so changing them does not recompile)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    kept = ((jnp.cumsum(probs, axis=-1) - probs) < top_p) | (top_p >= 1.0)  # smallest prefix reaching top_p
    cutoff = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


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
        token = _pick(logits, jax.random.fold_in(key, i), greedy, temperature, top_p)
        out = out.at[i].set(token[0])
        logits, cache = step(token, start + i, cache)
        return i + 1, jnp.isin(token[0], stop_ids), logits, cache, out

    out = jnp.zeros((max_new_tokens,), jnp.int32)
    state = (jnp.int32(0), jnp.bool_(False), logits, KVCache(*cache, start, mesh), out)
    count, _, _, _, out = lax.while_loop(cond, body, state)
    return out, count


# Entry point -----------------------------------------------------------------------------------


def _on_mesh(model, mesh):
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


def check_sampling(greedy: bool, temperature: float, top_p: float) -> None:
    if not greedy and not (temperature > 0 and 0 < top_p <= 1):
        raise UserError(f"sampling needs --temperature > 0 and 0 < --top-p <= 1 (got {temperature}, {top_p})")


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
    plan = plan_cache(cfg, len(prompt), max_new_tokens, mesh, device_memory)
    if mesh is not None:
        model = _on_mesh(model, mesh)
    logits, cache = prefill(model, prompt, plan, mesh)
    out, count = decode(model, cache, logits, plan, greedy=greedy, temperature=temperature, top_p=top_p,
                        seed=seed, stop_ids=stop_ids, mesh=mesh)
    return [int(t) for t in np.asarray(out)[: int(count)]]


def prefill(model, prompt: np.ndarray, plan: CachePlan, mesh=None):
    """`(logits [batch, vocab] at the last prompt token, (cache_k, cache_v))` for an int32 prompt
    `[prompt_len]`; the model's params must already sit on `mesh` (see `generate`).

    The prompt is padded at its end to `plan.prefill_len`, the padding in a segment of its own (id 0;
    the prompt's is 1) so the prompt never attends to it; decoding overwrites the padding's cache
    rows, one position at a time, before it can see them."""
    n, length = plan.prompt_len, plan.prefill_len
    impl = model.config.attention
    tokens = np.zeros((plan.batch, length), np.int32)
    tokens[:, :n] = prompt
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    segment_ids = (positions < n).astype(np.int32)
    tokens, positions, segment_ids = place((tokens, positions, segment_ids), impl, mesh)
    last = int(np.argmax(np.asarray(positions)[0] == n - 1))  # the last prompt token's slot in the layout
    static = dataclasses.replace(plan, prompt_len=0, max_new_tokens=0, bytes_per_device=0)  # shapes only
    if mesh is None:
        return _prefill(model, tokens, positions, segment_ids, jnp.int32(last), plan=static, mesh=None)
    with jax.set_mesh(mesh):
        return _prefill(model, tokens, positions, segment_ids, jnp.int32(last), plan=static, mesh=mesh)


def decode(model, cache, logits, plan: CachePlan, *, greedy: bool = True, temperature: float = 1.0,
           top_p: float = 1.0, seed: int = 0, stop_ids=(), mesh=None):
    """`(tokens [max_new_tokens], count)` on device: the decode loop after `prefill`."""
    stop = jnp.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], jnp.int32)
    return _decode(model, cache, logits, jnp.int32(plan.prompt_len), jax.random.key(seed), stop,
                   jnp.float32(temperature), jnp.float32(top_p), max_new_tokens=plan.max_new_tokens,
                   greedy=bool(greedy), mesh=mesh)


# Command ---------------------------------------------------------------------------------------

EOT_TOKEN = "<|eot_id|>"


def encode_prompt(text: str, tokenizer_dir, chat: bool) -> tuple[list[int], object]:
    """`(ids, tokenizer)`: BOS + the text, or with `chat` the text as one user turn rendered by the
    tokenizer's chat template with the assistant header appended (the template writes BOS)."""
    info = load_tokenizer_info(tokenizer_dir)
    tok = get_tokenizer(info.tokenizer_file)
    if chat:
        if info.chat_template is None:
            raise UserError(f"tokenizer {info.directory} has no chat template (no chat_template in "
                            "tokenizer_config.json, no chat_template.jinja); drop --chat or use a chat tokenizer")
        template = ChatTemplate(info.chat_template, dict(info.special_tokens))
        text = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False).ids
    if not ids or ids[0] != info.bos_id:
        ids = [info.bos_id, *ids]
    return ids, tok


def generate_command(ckpt, *, prompt: str | None = None, tokens=None, tokenizer=None, chat: bool = False,
                     max_new_tokens: int = 256, greedy: bool = True, temperature: float = 1.0,
                     top_p: float = 1.0, seed: int = 0, mesh=None, attention: str | None = None,
                     device_memory_gib: float | None = None) -> dict:
    """`lwm-jax generate`: `{"new_tokens": [...], "text": ...}` (text when a tokenizer is given).

    Prompt, tokenizer and lengths are checked against the checkpoint's config and the mesh
    before the model is loaded or anything compiles.
    """
    if prompt is not None and tokenizer is None:
        raise UserError("--prompt needs --tokenizer DIR to encode it (or give --tokens FILE.npy)")
    if chat and prompt is None:
        raise UserError("--chat applies the chat template to --prompt TEXT; it cannot wrap --tokens")
    check_sampling(greedy, temperature, top_p)
    tok = None
    if prompt is not None:
        ids, tok = encode_prompt(prompt, tokenizer, chat)
    else:
        path = str(tokens)
        try:
            ids = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read prompt tokens {path}: {err}") from None
        if tokenizer is not None:
            tok = get_tokenizer(load_tokenizer_info(tokenizer).tokenizer_file)
    config = from_dict(ModelConfig, read_metadata(ckpt)["model"])
    if attention is None:
        single = "blockwise" if config.attention == "ring" else config.attention
        attention = "ring" if seq_shards(mesh) > 1 else single
    config = config.replace(attention=attention)
    prompt_ids = check_prompt(ids, config.vocab_size)
    memory = None if device_memory_gib is None else int(device_memory_gib * 2**30)
    plan_cache(config, len(prompt_ids), max_new_tokens, mesh, memory)  # fails before loading
    check_context(len(prompt_ids) + max_new_tokens, config.max_position_embeddings, what="prompt + new tokens")
    stop = set(config.eos_token_id or ())  # None: the model has no end token
    if tok is not None and tok.token_to_id(EOT_TOKEN) is not None:
        stop.add(tok.token_to_id(EOT_TOKEN))
    model, _ = load_model(ckpt, mesh=mesh, attention=attention)
    new = generate(model, prompt_ids, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                   top_p=top_p, seed=seed, stop_ids=sorted(stop), mesh=mesh, device_memory=memory)
    result: dict = {"new_tokens": new}
    if tok is not None:
        result["text"] = tok.decode(new, skip_special_tokens=True)
    return result
