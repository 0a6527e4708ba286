"""Optimizer state in host memory (`optimizer.offload`): the float32 master weights and AdamW moments
live in `pinned_host`; a step streams them through the device one layer at a time.

The device holds the compute weights (the masters cast to the model's dtype, fetched layer by layer)
and their gradients. The update scans the stacked layer axis: bring one layer's masters and moments
in, run the optimizer on them, write them back; so device memory holds one layer's optimizer state
at a time. The update is the optimizer's own (`tx.update` on each slice of the tree), with the global
gradient-norm clip applied first over every gradient, exactly as `optax.clip_by_global_norm` does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from lwm_jax.errors import UserError

HOST = "pinned_host"
LAYERS = "layers"  # the params entry whose leaves are stacked over the layer axis


@dataclasses.dataclass(frozen=True)
class HostOffload:
    """How a step updates host-resident state: the optimizer without its clip (`make_optimizer(...,
    clip=False)`, whose state has the clipped one's structure) and the global-norm clip (0: none)."""

    tx: optax.GradientTransformation
    clip_norm: float


def memory_kinds(device) -> set[str]:
    """The memory kinds `device` can address (empty for a backend that exposes none)."""
    try:
        return {m.kind for m in device.addressable_memories()}
    except Exception:  # a backend without memory spaces raises its own error type
        return set()


def check_host_memory(devices, what: str = "optimizer.offload=true") -> None:
    """A UserError unless the devices can address a `pinned_host` memory to offload into."""
    device = next(iter(devices))
    kinds = memory_kinds(device)
    if HOST not in kinds:
        raise UserError(f"{what} needs host memory the {device.platform} backend can address ('{HOST}'); its "
                        f"devices offer {', '.join(sorted(kinds)) or 'no memory kinds'}: turn offload off there")


def on_host(shardings):
    """The same shardings in host memory."""
    return jax.tree.map(lambda s: s.with_memory_kind(HOST), shardings)


def _to_device(x):
    return jax.device_put(x, jax.memory.Space.Device)


def _to_host(x):
    return jax.device_put(x, jax.memory.Space.Host)


def _layer(x, index):
    """Layer `index` of a stacked `[layers, ...]` array."""
    return jax.lax.dynamic_index_in_dim(x, index, keepdims=False)


def _streamed(x) -> bool:
    """Whether a leaf is fetched one layer at a time: a stacked layer weight of three or more dims.
    A `[layers, embed]` norm scale is moved whole (it is tiny, and XLA:TPU tiles the layer axis of a
    2-D array, so a host DMA cannot slice one layer out of it)."""
    return x.ndim >= 3


def compute_weights(params: dict, dtype) -> dict:
    """Device copies of the host-resident master `params` in the compute `dtype`; the stacked layer
    weights are fetched and cast one layer at a time, so no float32 copy of them is on the device."""
    def fetch(x):
        return _to_device(x).astype(dtype)

    out = {k: jax.tree.map(fetch, v) for k, v in params.items() if k != LAYERS}
    if LAYERS in params:
        leaves, treedef = jax.tree.flatten(params[LAYERS])
        streamed = [_streamed(x) for x in leaves]
        fetched = iter(jax.lax.map(lambda xs: [fetch(x) for x in xs],
                                   [x for x, st in zip(leaves, streamed, strict=True) if st]))
        out[LAYERS] = treedef.unflatten([next(fetched) if st else fetch(x) for x, st in zip(leaves, streamed,
                                                                                               strict=True)])
    return out


def global_norm(grads):
    """The float32 L2 norm of all `grads` (of any float dtype), as `optax.tree.norm` of float32 ones."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))


def clip(g, g_norm, max_norm: float):
    """One gradient in float32, clipped as `optax.clip_by_global_norm(max_norm)` does given the
    global norm (0 disables clipping)."""
    g = g.astype(jnp.float32)
    return g if max_norm <= 0 else jnp.where(g_norm < max_norm, g, g / g_norm * max_norm)


def streamed_update(tx: optax.GradientTransformation, grads: dict, opt_state, params: dict, finite,
                    max_norm: float):
    """`(params, opt_state)` after one step of host-resident `params` and `opt_state` with the device
    `grads`, streamed over the layer axis; both unchanged where `finite` is False.

    `tx` is the optimizer without its clip (`make_optimizer(..., clip=False)`, which keeps the
    state's structure); the clip by the global norm to `max_norm` is applied here, a slice at a
    time. Each `tx.update` sees the whole tree with the leaves outside its slice replaced by
    scalars: AdamW is elementwise, and its schedule and weight-decay mask read only the step count
    and the paths.
    """
    g_norm = global_norm(grads)
    p_leaves, p_def = jax.tree.flatten(params)
    g_leaves = p_def.flatten_up_to(grads)
    streamed_tree = {k: jax.tree.map(lambda x, k=k: k == LAYERS and _streamed(x), v) for k, v in params.items()}
    streamed = p_def.flatten_up_to(streamed_tree)
    s_leaves, s_def = jax.tree.flatten(opt_state)
    # Per state leaf: whether it is a moment of a streamed weight, and whether it is a moment at all
    # (the rest are the step counters, which every part reads).
    s_streamed = s_def.flatten_up_to(optax.tree_map_params(tx, lambda _, m: m, opt_state, streamed_tree,
                                                           transform_non_params=lambda _: False))
    s_param = s_def.flatten_up_to(optax.tree_map_params(tx, lambda _: True, opt_state,
                                                        transform_non_params=lambda _: False))
    placeholder = jnp.zeros((), jnp.float32)

    def pick(values, flags, part):
        return [v for v, f in zip(values, flags, strict=True) if f == part]

    def fill(part_values, flags, part, other=None):
        """A full leaf list: `part_values` where `flags == part`, else `other`'s leaf or a placeholder."""
        values, rest = iter(part_values), iter(other or ())
        return [next(values) if f == part else (next(rest) if other is not None else placeholder) for f in flags]

    def update_part(g, p, s, counters, part: bool):
        """New `(params, state)` leaves of the part (`streamed == part`) from its device values."""
        state = s_def.unflatten([x if f == part else (placeholder if param else next(counters))
                                 for x, f, param in zip(fill(s, s_streamed, part), s_streamed, s_param,
                                                        strict=True)])
        full_p = p_def.unflatten(fill(p, streamed, part))
        updates, new_state = tx.update(p_def.unflatten(fill(g, streamed, part)), state, full_p)
        new_p = p_def.flatten_up_to(optax.apply_updates(full_p, updates))
        return pick(new_p, streamed, part), pick(s_def.flatten_up_to(new_state), s_streamed, part)

    def select(new, old):
        return [jnp.where(finite, n, o) for n, o in zip(new, old, strict=True)]

    # Whole: the embedding, output head, norm scales and the step counters.
    p_whole = [_to_device(x) for x in pick(p_leaves, streamed, False)]
    s_whole = [_to_device(x) for x in pick(s_leaves, s_streamed, False)]
    g_whole = [clip(g, g_norm, max_norm) for g in pick(g_leaves, streamed, False)]
    counters = pick(s_whole, [not f for f in pick(s_param, s_streamed, False)], True)
    new_p, new_s = update_part(g_whole, p_whole, s_whole, iter(counters), part=False)
    new_p_whole = [_to_host(x) for x in select(new_p, p_whole)]
    new_s_whole = [_to_host(x) for x in select(new_s, s_whole)]

    # Streamed: one layer's masters and moments on the device at a time, written back into the
    # stacked host arrays in place (a loop carry, not scan outputs: no second host copy of them).
    def layer_step(index, carry):
        p_stack, s_stack = carry
        p, s = [_to_device(_layer(x, index)) for x in p_stack], [_to_device(_layer(x, index)) for x in s_stack]
        g = [clip(_layer(x, index), g_norm, max_norm) for x in g_stack]
        new_p, new_s = update_part(g, p, s, iter(counters), part=True)

        def put(stack, new, old):
            return [jax.lax.dynamic_update_index_in_dim(x, _to_host(v), index, 0)
                    for x, v in zip(stack, select(new, old), strict=True)]

        return put(p_stack, new_p, p), put(s_stack, new_s, s)

    g_stack = pick(g_leaves, streamed, True)
    layers = g_stack[0].shape[0] if g_stack else 0
    new_p_layers, new_s_layers = jax.lax.fori_loop(
        0, layers, layer_step, (pick(p_leaves, streamed, True), pick(s_leaves, s_streamed, True)))
    return (p_def.unflatten(fill(new_p_layers, streamed, True, new_p_whole)),
            s_def.unflatten(fill(new_s_layers, s_streamed, True, new_s_whole)))
