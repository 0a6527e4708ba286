"""Flax NNX Llama-3: embedding, RMSNorm, GQA attention with RoPE, SwiGLU MLP, output head.

Layers are stacked (leading `layers` axis on every weight) and run with `jax.lax.scan`, so compile
time does not grow with depth; each layer is wrapped in `jax.checkpoint` under the configured remat
policy. Weights are float32 masters carrying logical sharding names; matmuls run in `config.dtype`.
Weight layout follows Hugging Face (only transposed / split per head), so conversion needs no
q/k permutation. One forward pass serves training, prefill (it also returns every layer's keys and
values) and cached decoding (`KVCache`, flash-decoding over the sequence-sharded cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lwm_jax.attention import attention
from lwm_jax.attention.decode import KVCache, cache_attention
from lwm_jax.config import ModelConfig
from lwm_jax.model.rope import apply_rope, model_inv_frequencies
from lwm_jax.parallel.mesh import constrain

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def _param(rngs: nnx.Rngs, shape, axes, stddev: float) -> nnx.Param:
    return nnx.Param(stddev * jax.random.normal(rngs.params(), shape, jnp.float32), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


class Attention(nnx.Module):
    """GQA self-attention: q `[embed, heads, head_dim]`, k/v `[embed, kv_heads, head_dim]`."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, hd, std = config.hidden_size, config.head_dim, config.initializer_range
        self.config = config
        self.q_proj = _param(rngs, (d, config.num_heads, hd), ("embed", "heads", "head_dim"), std)
        self.k_proj = _param(rngs, (d, config.num_kv_heads, hd), ("embed", "kv_heads", "head_dim"), std)
        self.v_proj = _param(rngs, (d, config.num_kv_heads, hd), ("embed", "kv_heads", "head_dim"), std)
        self.o_proj = _param(rngs, (config.num_heads, hd, d), ("heads", "head_dim", "embed"), std)

    def qkv(self, x, positions):
        """RoPE'd `q: [batch, seq, heads, head_dim]` and `k, v: [batch, seq, kv_heads, head_dim]`."""
        dt = x.dtype
        q = jnp.einsum("bsd,dhk->bshk", x, self.q_proj[...].astype(dt))
        k = jnp.einsum("bsd,dhk->bshk", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("bsd,dhk->bshk", x, self.v_proj[...].astype(dt))
        q = constrain(q, ("batch", "length", "act_heads", None))
        k = constrain(k, ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))
        inv_freq = model_inv_frequencies(self.config)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def project_out(self, out):
        """`[batch, seq, embed]` from the attention output `[batch, seq, heads, head_dim]`."""
        return jnp.einsum("bshk,hkd->bsd", out, self.o_proj[...].astype(out.dtype))

    def __call__(self, x, positions, segment_ids=None, cache: KVCache | None = None, layer=None):
        """`(out [batch, seq, embed], kv)`: `kv` is this layer's `(k, v)` without a cache; with one
        (decoding, `x: [batch, 1, embed]`) it is the cache with them written at layer `layer`."""
        cfg = self.config
        q, k, v = self.qkv(x, positions)
        if cache is not None:
            out, cache = cache_attention(q, k, v, cache, layer)
            return self.project_out(out), cache
        out = attention(q, k, v, segment_ids=segment_ids, positions=positions, causal=True,
                        impl=cfg.attention, block_size=cfg.attention_block_size, kernel=cfg.attention_kernel)
        return self.project_out(out), (k, v)


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, f, std = config.hidden_size, config.intermediate_size, config.initializer_range
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), std)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), std)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), std)

    def __call__(self, x):
        dt = x.dtype
        gate = x @ self.gate_proj[...].astype(dt)
        up = x @ self.up_proj[...].astype(dt)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return hidden @ self.down_proj[...].astype(dt)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, positions, segment_ids=None, cache: KVCache | None = None, layer=None):
        """`(x, kv)` after the layer; `kv` as `Attention.__call__` returns it."""
        out, kv = self.self_attn(self.input_layernorm(x), positions, segment_ids, cache, layer)
        x = x + out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "act_embed")), kv


def _stack_layers(config: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """One DecoderLayer whose weights carry a leading `[num_layers]` axis (named `layers`)."""
    keys = jax.random.split(rngs.params(), config.num_layers)

    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        return DecoderLayer(config, nnx.Rngs(params=key))

    stacked = create(keys)
    for _, variable in nnx.iter_graph(stacked):
        if isinstance(variable, nnx.Variable):
            axes = variable.get_metadata().get("logical_axes")
            if axes is not None and len(axes) < variable.get_value().ndim:
                variable.set_metadata("logical_axes", ("layers", *axes))
    return stacked


class Llama(nnx.Module):
    """Llama-3 causal LM. `model(tokens, positions, segment_ids) -> logits [batch, seq, vocab]`."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        d, v, std = config.hidden_size, config.vocab_size, config.initializer_range
        self.embed_tokens = _param(rngs, (v, d), ("vocab", "embed"), std)
        self.layers = _stack_layers(config, rngs)
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else _param(rngs, (d, v), ("embed", "vocab"), std)

    def output_weights(self) -> jax.Array:
        """The `[embed, vocab]` output projection (the embedding, transposed, when tied)."""
        return self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]

    def embed(self, tokens) -> jax.Array:
        """Token embeddings `[batch, seq, embed]` in the compute dtype."""
        # The table is gathered whole (FSDP) before the lookup, so its gradient is one scatter-add into
        # a local float32 table and a reduce-scatter, whatever the mesh; left to itself the SPMD
        # partitioner picks a mesh-dependent plan and, on fsdp x sp meshes, replicates through it.
        table = constrain(self.embed_tokens[...], ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(jnp.dtype(self.config.dtype))
        return constrain(x, ("batch", "length", "act_embed"))

    def forward(self, tokens, positions=None, segment_ids=None, *, cache: KVCache | None = None,
                return_kv: bool = False):
        """`(hidden, kv)`: final-norm hidden states `[batch, seq, embed]` in the compute dtype, and

        - training and scoring (no cache, `return_kv=False`): `kv` is None;
        - prefill (`return_kv=True`): every layer's keys and values, `[layers, batch, seq, kv_heads,
          head_dim]` each, in the token order of the input;
        - decoding (`cache`): `tokens: [batch, 1]` at position `cache.pos`; `kv` is the cache with
          the new keys and values written.
        """
        cfg = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        graphdef, state = nnx.split(self.layers)

        def layer_step(carry, inputs):
            h, c = carry
            layer_state, index = inputs
            h, kv = nnx.merge(graphdef, layer_state)(h, positions, segment_ids, c, index)
            if c is not None:
                return (h, kv), None
            return (h, None), kv if return_kv else None

        if cfg.remat != "none" and cache is None and not return_kv:
            layer_step = jax.checkpoint(layer_step, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        carry, inputs = (self.embed(tokens), cache), (state, jnp.arange(cfg.num_layers, dtype=jnp.int32))
        if cfg.scan_layers:
            carry, kv = jax.lax.scan(layer_step, carry, inputs)
        else:
            outs = []
            for i in range(cfg.num_layers):
                carry, out = layer_step(carry, jax.tree.map(lambda a, i=i: a[i], inputs))
                outs.append(out)
            kv = jax.tree.map(lambda *xs: jnp.stack(xs), *outs) if return_kv and cache is None else None
        x, cache = carry
        return self.norm(x), cache if cache is not None else kv

    def hidden(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """Final-norm hidden states `[batch, seq, embed]` in the compute dtype (training, scoring)."""
        return self.forward(tokens, positions, segment_ids)[0]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits `[..., vocab]` for hidden states `[..., embed]`."""
        out = hidden @ self.output_weights().astype(hidden.dtype)
        return out.astype(jnp.float32)

    def __call__(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        return self.logits(self.hidden(tokens, positions, segment_ids))
