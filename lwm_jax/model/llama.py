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
from jax.ad_checkpoint import checkpoint_name

from lwm_jax.attention import attention
from lwm_jax.attention.decode import KVCache, cache_attention
from lwm_jax.config import REMAT_POLICIES, ModelConfig
from lwm_jax.errors import UserError
from lwm_jax.model.embed import embed_lookup
from lwm_jax.model.rope import apply_rope, model_inv_frequencies, model_rope_scale
from lwm_jax.parallel.mesh import constrain, seq_shards

LAYER_INPUT = "layer_input"  # the residual stream entering a layer: what the layer scan keeps for the backward
# The `jax.checkpoint` policy of each remat name but `none` (no checkpoint at all).
CHECKPOINT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Full remat with the kept layer inputs in host memory, fetched back layer by layer in the backward.
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=(LAYER_INPUT,),
        offload_src="device", offload_dst="pinned_host"),
}
assert ("none", *CHECKPOINT_POLICIES) == REMAT_POLICIES, "config.REMAT_POLICIES must name exactly these"
TILE_TOKENS = 2048  # the default tile: the MLP working set of 2,048 tokens is well under the attention's


def seq_tile_for(config: ModelConfig, local_len: int) -> int:
    """Tokens per tile of a device's `local_len` tokens: `config.seq_tile`, or the largest halving of
    `local_len` that is at most TILE_TOKENS (the whole local sequence when it is that short)."""
    tile = config.seq_tile or local_len
    if not config.seq_tile:
        while tile > TILE_TOKENS and tile % 2 == 0:
            tile //= 2
    return tile


def map_tiles(fn, arrays: tuple, tile: int, remat: bool):
    """`fn(*arrays)` for arrays `[batch, seq, ...]` with seq over the mesh's `sp` and `ulysses` axes (`fn` returns an
    array or a tuple of them, of the same leading shape), computed one tile of every device's local
    sequence at a time (a `lax.map`, each tile recomputed on its own in the backward when `remat`),
    so per-token work holds one tile's intermediates, not the whole local sequence's."""
    sp = seq_shards(jax.sharding.get_abstract_mesh())  # every sequence shard (sp major, then ulysses): `length`
    batch, seq = arrays[0].shape[:2]
    n = seq // sp // tile
    if n <= 1:
        return fn(*arrays)
    if seq % (sp * tile):
        raise UserError(f"seq_tile={tile} must divide each device's local sequence of {seq // sp} tokens "
                        f"(seq_len {seq}, sp*ulysses={sp}); use a divisor of it or 0 (automatic)")

    def split(a):  # [b, s, *r] -> [n, b, sp*tile, *r]: tile t of every device's local chunk
        rest = a.shape[2:]
        a = constrain(a.reshape(batch, sp, n, tile, *rest), ("batch", "length") + (None,) * (2 + len(rest)))
        return jnp.moveaxis(a, 2, 0).reshape(n, batch, sp * tile, *rest)

    def merge(y):  # [n, b, sp*tile, *r] -> [b, s, *r]
        rest = y.shape[3:]
        y = jnp.moveaxis(y.reshape(n, batch, sp, tile, *rest), 0, 2)
        return constrain(y, ("batch", "length") + (None,) * (2 + len(rest))).reshape(batch, seq, *rest)

    body = (lambda xs: fn(*xs))
    out = jax.lax.map(jax.checkpoint(body) if remat else body, tuple(split(a) for a in arrays))
    return jax.tree.map(merge, out)


@jax.custom_vjp
def accumulate_into(params, acc, index):
    """`(params, acc)` unchanged (one layer's weights; the stacked float32 accumulator, a carry of the
    layer scan). Backward: the weights' cotangent is added into slice `index` of the accumulator's
    cotangent, `acc_ct[index] + ct` in place (the weights get none). Through the scan the
    accumulator's cotangent then collects every layer's gradient, in the backward scan's carry."""
    return params, acc


def _accumulate_fwd(params, acc, index):
    return (params, acc), index


def _accumulate_bwd(index, cts):
    ct_params, ct_acc = cts
    ct_acc = jax.tree.map(lambda a, g: a.at[index].add(g.astype(a.dtype)), ct_acc, ct_params)
    return None, ct_acc, None


accumulate_into.defvjp(_accumulate_fwd, _accumulate_bwd)


@jax.custom_vjp
def seed_cotangent(acc_out, acc_in):
    """0.0, whose backward gives `acc_out` the cotangent `acc_in` (whatever the incoming scalar's):
    added to the loss, it starts the accumulator's backward carry at the running sum."""
    return jnp.zeros((), jnp.float32)


def _seed_fwd(acc_out, acc_in):
    return jnp.zeros((), jnp.float32), acc_in


def _seed_bwd(acc_in, ct):
    return acc_in, None


seed_cotangent.defvjp(_seed_fwd, _seed_bwd)


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
        inv_freq, scale = model_inv_frequencies(self.config), model_rope_scale(self.config)
        return apply_rope(q, positions, inv_freq, scale), apply_rope(k, positions, inv_freq, scale), v

    def project_out(self, out):
        """`[batch, seq, embed]` from the attention output `[batch, seq, heads, head_dim]`."""
        return jnp.einsum("bshk,hkd->bsd", out, self.o_proj[...].astype(out.dtype))

    def attend(self, q, k, v, positions, segment_ids=None, cache: KVCache | None = None, layer=None):
        """`(heads [batch, seq, heads, head_dim], kv)`: the attention output before `project_out`;
        `kv` is this layer's `(k, v)` without a cache; with one (decoding, one token) it is the cache
        with them written at layer `layer`."""
        cfg = self.config
        if cache is not None:
            return cache_attention(q, k, v, cache, layer)
        out = attention(q, k, v, segment_ids=segment_ids, positions=positions, causal=True,
                        impl=cfg.attention, block_size=cfg.attention_block_size, kernel=cfg.attention_kernel)
        return out, (k, v)


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
        self.config = config
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, positions, segment_ids=None, cache: KVCache | None = None, layer=None):
        """`(x, kv)` after the layer; `kv` as `Attention.attend` returns it. Everything but the
        attention itself is per token and runs over sequence tiles (`map_tiles`): the norm and the
        q/k/v projections before it, the output projection, norm and MLP after it."""
        cfg = self.config
        local = x.shape[1] // seq_shards(jax.sharding.get_abstract_mesh())
        tile = seq_tile_for(cfg, local) if cache is None else x.shape[1]
        remat = cfg.remat in ("full", "offload")
        q, k, v = map_tiles(self.project_in, (x, positions), tile, remat)
        heads, kv = self.self_attn.attend(q, k, v, positions, segment_ids, cache, layer)
        return map_tiles(self.finish, (x, heads), tile, remat), kv

    def project_in(self, x, positions):
        """The per-token start of the layer: norm, then RoPE'd q, k, v."""
        return self.self_attn.qkv(self.input_layernorm(x), positions)

    def finish(self, x, heads):
        """The per-token rest of the layer: output projection and residual, norm, MLP and residual."""
        x = x + self.self_attn.project_out(heads)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "act_embed"))


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
        dtype = jnp.dtype(self.config.dtype)
        if self.config.embed_lookup == "sharded":
            return constrain(embed_lookup(self.embed_tokens[...], tokens, dtype), ("batch", "length", "act_embed"))
        # Gathered: the table whole (FSDP) before the lookup, its gradient one scatter-add into a local
        # float32 table and a reduce-scatter; left to itself the SPMD partitioner picks a mesh-dependent
        # plan and, on fsdp x sp meshes, replicates through it.
        table = constrain(self.embed_tokens[...], ("vocab", None))
        return constrain(jnp.take(table, tokens, axis=0).astype(dtype), ("batch", "length", "act_embed"))

    def forward(self, tokens, positions=None, segment_ids=None, *, cache: KVCache | None = None,
                return_kv: bool = False, layer_grad_acc=None):
        """`(hidden, kv)`: final-norm hidden states `[batch, seq, embed]` in the compute dtype, and

        - training and scoring (no cache, `return_kv=False`): `kv` is None;
        - prefill (`return_kv=True`): every layer's keys and values, `[layers, batch, seq, kv_heads,
          head_dim]` each, in the token order of the input;
        - decoding (`cache`): `tokens: [batch, 1]` at position `cache.pos`; `kv` is the cache with
          the new keys and values written.

        `layer_grad_acc` (training, gradient accumulation): a float32 pure dict shaped like the
        stacked layer params, carried through the layer scan unchanged; it then comes back as a
        third value (`(hidden, None, acc_out)`). Differentiate with respect to it, with
        `seed_cotangent(acc_out, layer_grad_acc)` added to the loss, and its gradient is
        `layer_grad_acc + the layers' gradient`, each layer's added into its slice in place in the
        backward scan's carry (`accumulate_into`): no stacked layer gradient beside the accumulator.
        """
        cfg = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        graphdef, state = nnx.split(self.layers)

        def layer_step(carry, inputs):
            h, c, acc = carry
            h = checkpoint_name(h, LAYER_INPUT)  # the remat policy `offload` keeps it in host memory
            layer_state, index = inputs
            if acc is not None:
                pure, acc = accumulate_into(nnx.to_pure_dict(layer_state), acc, index)
                nnx.replace_by_pure_dict(layer_state, pure)
            h, kv = nnx.merge(graphdef, layer_state)(h, positions, segment_ids, c, index)
            if c is not None:
                return (h, kv, acc), None
            return (h, None, acc), kv if return_kv else None

        if cfg.remat != "none" and cache is None and not return_kv:
            layer_step = jax.checkpoint(layer_step, policy=CHECKPOINT_POLICIES[cfg.remat],
                                        prevent_cse=not cfg.scan_layers)
        carry = (self.embed(tokens), cache, layer_grad_acc)
        inputs = (state, jnp.arange(cfg.num_layers, dtype=jnp.int32))
        if cfg.scan_layers:
            carry, kv = jax.lax.scan(layer_step, carry, inputs)
        else:
            outs = []
            for i in range(cfg.num_layers):
                carry, out = layer_step(carry, jax.tree.map(lambda a, i=i: a[i], inputs))
                outs.append(out)
            kv = jax.tree.map(lambda *xs: jnp.stack(xs), *outs) if return_kv and cache is None else None
        x, cache, acc = carry
        if layer_grad_acc is not None:
            return self.norm(x), None, acc
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
