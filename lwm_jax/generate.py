"""KV-cache generation: prefill with the model's attention (the ring over `sp`), then decode one
token at a time over a sequence-sharded cache with flash-decoding.

The cache `[layers, batch, cache_len, kv_heads, head_dim]` is kept in natural token order, sharded
over `sp` along the sequence (and over `tp` along the heads). A decode step writes the new key and
value on the device that owns its position, lets every device attend the query over its own slice
(partial max, sum and weighted values) and combines the partials across `sp` through their
log-sum-exp: only `[batch, heads, head_dim]` partials travel, never the cache.
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
from jax.sharding import NamedSharding, PartitionSpec as P

from lwm_jax.attention import attention
from lwm_jax.attention.layout import from_zigzag, to_zigzag
from lwm_jax.attention.reference import MASK_VALUE
from lwm_jax.config import ModelConfig
from lwm_jax.errors import UserError

SP, HEADS_AXIS, BATCH_AXES = "sp", "tp", ("dp", "fsdp")
CACHE_QUANTUM = 128  # cache positions per sp device are rounded up to this (fewer recompiles)
PAD_QUANTUM = 16  # prefill positions per zigzag chunk (per device without the ring) likewise


# Plan ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """Static shapes of one generation: prompt padding, cache length, rows and sharding sizes."""

    prompt_len: int
    max_new_tokens: int
    prefill_len: int  # the prompt padded to what the prefill attention needs
    cache_len: int  # >= prefill_len and prompt_len + max_new_tokens; a multiple of sp
    batch: int  # rows: the prompt repeated over dp*fsdp (a mesh shards the batch over them)
    sp: int
    tp: int
    ring: bool
    bytes_per_device: int  # params + cache, the estimate checked against device memory


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def prefill_length(prompt_len: int, sp: int, block_size: int, impl: str) -> int:
    """The prompt length padded for the prefill attention: the ring needs a multiple of
    `2*sp*block` with `block = min(block_size, len // (2*sp))`, blockwise a multiple of its block."""
    if impl == "ring":
        n = _round_up(prompt_len, 2 * sp * PAD_QUANTUM)
        return n if n <= 2 * sp * block_size else _round_up(prompt_len, 2 * sp * block_size)
    if impl == "blockwise" and prompt_len > block_size:
        return _round_up(prompt_len, block_size)
    return _round_up(prompt_len, sp * PAD_QUANTUM)


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
    if ring and mesh is None:
        raise UserError("attention='ring' needs a mesh with an sp axis (e.g. --mesh sp=4); "
                        "without one use --attention blockwise")
    if config.num_kv_heads % tp:
        raise UserError(f"kv_heads={config.num_kv_heads} must be divisible by tp={tp} (the KV cache "
                        "shards its heads over tp)")
    prefill = prefill_length(prompt_len, sp, config.attention_block_size, config.attention)
    cache_len = _round_up(max(prefill, prompt_len + max_new_tokens), CACHE_QUANTUM * sp)
    itemsize = jnp.dtype(config.dtype).itemsize
    cache_bytes = 2 * config.num_layers * batch * cache_len * config.num_kv_heads * config.head_dim * itemsize
    weight_ways = sizes.get("fsdp", 1) * sp * tp
    per_device = cache_bytes // (sp * tp) // batch + config.num_params * 4 // weight_ways
    limit = device_memory if device_memory is not None else device_memory_bytes(mesh)
    if limit is not None and per_device > limit:
        gib = 2.0**30
        raise UserError(
            f"prompt {prompt_len:,} + {max_new_tokens:,} new tokens need a {cache_len:,}-token KV cache: "
            f"{per_device / gib:.3f} GiB per device with sp={sp} (params and cache), more than the "
            f"{limit / gib:.3f} GiB a device holds; use a mesh with a larger sp or fewer tokens")
    return CachePlan(prompt_len, max_new_tokens, prefill, cache_len, batch, sp, tp, ring, per_device)


# Flash-decoding over the sequence-sharded cache -------------------------------------------------


def _local_decode(q, k_new, v_new, cache_k, cache_v, layer, pos, *, axis):
    """One device's part of a decode step on layer `layer` of the stacked cache: writes `k_new,
    v_new` at `pos` if this device owns it (one row, in place), attends `q` over the local slice
    and combines the partial softmaxes over `axis` (if any).

    `q: [b, 1, q_heads, d]`, `k_new, v_new: [b, 1, kv_heads, d]`, caches `[layers, b, local, kv_heads, d]`.
    """
    local = cache_k.shape[2]
    start = lax.axis_index(axis) * local if axis else 0
    offset = pos - start
    mine = (offset >= 0) & (offset < local)
    slot = jnp.clip(offset, 0, local - 1)
    zero = jnp.int32(0)
    corner = (layer, zero, slot, zero, zero)

    def write(cache, new):
        old = lax.dynamic_slice(cache, corner, (1, *new.shape))
        return lax.dynamic_update_slice(cache, jnp.where(mine, new[None].astype(cache.dtype), old), corner)

    cache_k, cache_v = write(cache_k, k_new), write(cache_v, v_new)
    keys = lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False)
    values = lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False)
    b, _, q_heads, d = q.shape
    kv_heads = keys.shape[2]
    qg = q.reshape(b, kv_heads, q_heads // kv_heads, d).astype(jnp.float32)
    scores = jnp.einsum("bkgd,btkd->bkgt", qg, keys.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(d))
    visible = (start + jnp.arange(local)) <= pos  # [local]
    scores = jnp.where(visible, scores, MASK_VALUE)
    top = scores.max(axis=-1)  # [b, kv, g]
    if axis:
        top = lax.pmax(top, axis)
    probs = jnp.where(visible, jnp.exp(scores - top[..., None]), 0.0)
    total = probs.sum(axis=-1)
    out = jnp.einsum("bkgt,btkd->bkgd", probs, values.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    if axis:
        total, out = lax.psum((total, out), axis)
    out = (out / total[..., None]).reshape(b, 1, q_heads, d).astype(q.dtype)
    return out, cache_k, cache_v


def _specs(mesh):
    """PartitionSpecs of the one-token `q/k/v` and of the stacked cache."""
    names = mesh.axis_names
    batch = tuple(a for a in BATCH_AXES if a in names) or None
    heads = HEADS_AXIS if HEADS_AXIS in names else None
    return P(batch, None, heads, None), P(None, batch, SP, heads, None)


def cache_attention(q, k_new, v_new, cache_k, cache_v, layer, pos, mesh=None):
    """`(out [b, 1, q_heads, d], cache_k, cache_v)`: one decode step of layer `layer` over the
    stacked cache `[layers, b, cache_len, kv_heads, d]` sharded on `mesh`'s `sp` axis
    (flash-decoding: the cache never moves), or on one device without a mesh."""
    if mesh is None:
        return _local_decode(q, k_new, v_new, cache_k, cache_v, layer, pos, axis=None)
    tok_spec, cache_spec = _specs(mesh)
    return jax.shard_map(
        functools.partial(_local_decode, axis=SP), mesh=mesh,
        in_specs=(tok_spec, tok_spec, tok_spec, cache_spec, cache_spec, P(), P()),
        out_specs=(tok_spec, cache_spec, cache_spec), check_vma=False)(
            q, k_new, v_new, cache_k, cache_v, layer, pos)


# Prefill and decode ----------------------------------------------------------------------------


def _embed(model, tokens):
    return jnp.take(model.embed_tokens[...], tokens, axis=0).astype(jnp.dtype(model.config.dtype))


def _scan_layers(model, x, body, xs=None):
    """`lax.scan` of `body(layer, h, x_i) -> (h, y_i)` over the stacked layers."""
    graphdef, state = nnx.split(model.layers)

    def step(h, inputs):
        layer_state, extra = inputs
        return body(nnx.merge(graphdef, layer_state), h, extra)

    return lax.scan(step, x, (state, xs))


@functools.partial(nnx.jit, static_argnames=("plan", "mesh"))
def _prefill(model, tokens, positions, last, *, plan: CachePlan, mesh):
    """Logits `[batch, vocab]` at slot `last` of `tokens` and the cache `(k, v)` in natural order.

    `tokens, positions: [batch, prefill_len]` (zigzag layout when the model runs the ring).
    """
    cfg = model.config

    def body(layer, h, _):
        def attend(q, k, v):
            out = attention(q, k, v, positions=positions, causal=True, impl=cfg.attention,
                            block_size=cfg.attention_block_size, kernel=cfg.attention_kernel)
            return out, (k, v)

        return layer.run(h, positions, attend)

    x, (k, v) = _scan_layers(model, _embed(model, tokens), body)  # k: [layers, b, prefill, kv, d]
    logits = model.logits(model.norm(lax.dynamic_index_in_dim(x, last, axis=1, keepdims=False)))
    if plan.ring:
        k, v = from_zigzag(k, plan.sp, axis=2), from_zigzag(v, plan.sp, axis=2)
    pad = ((0, 0), (0, 0), (0, plan.cache_len - plan.prefill_len), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    if mesh is not None:
        sharding = NamedSharding(mesh, _specs(mesh)[1])
        k, v = lax.with_sharding_constraint(k, sharding), lax.with_sharding_constraint(v, sharding)
    return logits, (k, v)


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
    until `max_new_tokens` are out or one of `stop_ids` was picked (it is kept)."""

    def step(token, pos, cache):
        def body(layer, carry, index):
            h, cache = carry

            def attend(q, k, v):
                out, ck, cv = cache_attention(q, k, v, *cache, index, pos, mesh)
                return out, (ck, cv)

            return layer.run(h, positions, attend), None

        positions = jnp.full(token.shape + (1,), pos, jnp.int32)
        layers = jnp.arange(model.config.num_layers, dtype=jnp.int32)
        (x, cache), _ = _scan_layers(model, (_embed(model, token[:, None]), cache), body, layers)
        return model.logits(model.norm(x)[:, 0]), cache

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
    state = (jnp.int32(0), jnp.bool_(False), logits, cache, out)
    count, _, _, _, out = lax.while_loop(cond, body, state)
    return out, count


# Entry point -----------------------------------------------------------------------------------


def _on_mesh(model, mesh):
    """The model with its params placed by the logical rules on `mesh` (no copy if they are)."""
    from lwm_jax.parallel.mesh import state_shardings

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
    `[prompt_len]`; the model's params must already sit on `mesh` (see `generate`)."""
    n, length = plan.prompt_len, plan.prefill_len
    tokens = np.zeros((plan.batch, length), np.int32)
    tokens[:, :n] = prompt
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    last = n - 1
    if plan.ring:
        tokens, positions = to_zigzag(tokens, plan.sp), to_zigzag(positions, plan.sp)
        last = int(np.argmax(positions[0] == n - 1))  # the last prompt token's zigzag slot
    static = dataclasses.replace(plan, prompt_len=0, max_new_tokens=0, bytes_per_device=0)  # shapes only
    if mesh is None:
        return _prefill(model, tokens, positions, jnp.int32(last), plan=static, mesh=None)
    sharding = NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None, SP))
    tokens, positions = jax.device_put(tokens, sharding), jax.device_put(positions, sharding)
    with jax.set_mesh(mesh):
        return _prefill(model, tokens, positions, jnp.int32(last), plan=static, mesh=mesh)


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
    from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info

    info = load_tokenizer_info(tokenizer_dir)
    tok = get_tokenizer(info.tokenizer_file)
    if chat:
        if info.chat_template is None:
            raise UserError(f"tokenizer {info.directory} has no chat template (no chat_template in "
                            "tokenizer_config.json, no chat_template.jinja); drop --chat or use a chat tokenizer")
        from lwm_jax.data.chat import ChatTemplate

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
    from lwm_jax.config import from_dict
    from lwm_jax.train.checkpoint import load_model, read_metadata

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
            from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info

            tok = get_tokenizer(load_tokenizer_info(tokenizer).tokenizer_file)
    sp = dict(mesh.shape).get(SP, 1) if mesh is not None else 1
    config = from_dict(ModelConfig, read_metadata(ckpt)["model"])
    if attention is None:
        attention = "ring" if sp > 1 else ("blockwise" if config.attention == "ring" else config.attention)
    config = config.replace(attention=attention)
    prompt_ids = check_prompt(ids, config.vocab_size)
    memory = None if device_memory_gib is None else int(device_memory_gib * 2**30)
    plan_cache(config, len(prompt_ids), max_new_tokens, mesh, memory)  # fails before loading
    stop = set(config.eos_token_id)
    if tok is not None and tok.token_to_id(EOT_TOKEN) is not None:
        stop.add(tok.token_to_id(EOT_TOKEN))
    model, _ = load_model(ckpt, mesh=mesh, attention=attention)
    new = generate(model, prompt_ids, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                   top_p=top_p, seed=seed, stop_ids=sorted(stop), mesh=mesh, device_memory=memory)
    result: dict = {"new_tokens": new}
    if tok is not None:
        result["text"] = tok.decode(new, skip_special_tokens=True)
    return result
