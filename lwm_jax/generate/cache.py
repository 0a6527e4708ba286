"""The shape of one generation, fixed before anything compiles: the prompt's padding, the KV cache's
length and sharding over the mesh, and whether params plus cache fit a device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lwm_jax.attention.layout import check_mesh, layout_length
from lwm_jax.config import ModelConfig
from lwm_jax.errors import UserError
from lwm_jax.parallel.mesh import FSDP, HEADS_AXIS, SP, axis_sizes, batch_shards, seq_shards

CACHE_QUANTUM = 128  # cache positions per sp device are rounded up to this (fewer recompiles)
PAD_QUANTUM = 16  # prefill positions per zigzag chunk (per device without the ring) likewise


@dataclasses.dataclass(frozen=True)
class CacheSpec:
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


def cache_spec(config: ModelConfig, prompt_len: int, max_new_tokens: int, mesh=None,
               device_memory: int | None = None) -> CacheSpec:
    """Checks a generation against the mesh before anything compiles; raises UserError when the
    prompt is empty, the heads do not divide over tp, or params + cache exceed a device's memory
    (`device_memory` bytes, else what the device reports; unchecked when neither is known)."""
    if prompt_len < 1:
        raise UserError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    sizes = axis_sizes(mesh)
    sp, tp = sizes[SP], sizes[HEADS_AXIS]
    ring = config.attention == "ring"
    check_mesh(config.attention, mesh)
    if config.num_kv_heads % tp:
        raise UserError(f"kv_heads={config.num_kv_heads} must be divisible by tp={tp} (the KV cache "
                        "shards its heads over tp)")
    prefill = layout_length(prompt_len, config.attention, mesh, config.attention_block_size, PAD_QUANTUM)
    shards = seq_shards(mesh)  # the cache's length axis is over sp and ulysses
    batch = batch_shards(mesh)
    cache_len = _round_up(max(prefill, prompt_len + max_new_tokens), CACHE_QUANTUM * shards)
    itemsize = jnp.dtype(config.dtype).itemsize
    cache_bytes = 2 * config.num_layers * batch * cache_len * config.num_kv_heads * config.head_dim * itemsize
    weight_ways = sizes[FSDP] * shards * tp
    per_device = cache_bytes // (shards * tp) // batch + config.num_params * 4 // weight_ways
    limit = device_memory if device_memory is not None else device_memory_bytes(mesh)
    if limit is not None and per_device > limit:
        gib = 2.0**30
        raise UserError(
            f"prompt {prompt_len:,} + {max_new_tokens:,} new tokens need a {cache_len:,}-token KV cache: "
            f"{per_device / gib:.3f} GiB per device with sp={sp}{'' if shards == sp else f', ulysses={shards // sp}'} "
            f"(params and cache), more than the {limit / gib:.3f} GiB a device holds; use a mesh with a larger "
            "sp (or ulysses) or fewer tokens")
    return CacheSpec(prompt_len, max_new_tokens, prefill, cache_len, batch, sp, tp, ring, per_device)
