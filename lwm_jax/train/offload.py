"""Optimizer state in host memory (`optimizer.offload`): the float32 master weights and AdamW moments
live in `pinned_host`; a step streams them through the device a slice at a time.

The device holds the compute weights (the masters cast to the model's dtype, fetched a slice at a
time) and their gradients. The update loops over the slices (one layer of the stacked weights, one
chunk of the embedding and head): bring a slice's masters and moments in, run the optimizer on
them, write them back in place; so device memory holds one slice of optimizer state at a time. The
update is the optimizer's own (`tx.update` on each slice of the tree), with the global gradient-norm
clip applied exactly as `optax.clip_by_global_norm` does.
"""

from __future__ import annotations

import dataclasses
import math

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


WHOLE, LAYER_GROUP = 0, 1  # the group of leaves moved whole, and of the stacked layer weights
SUBLANES = 16  # rows per chunk are a multiple of this: whole (8, 128) tiles of float32 and (16, 128) of bfloat16


@dataclasses.dataclass(frozen=True)
class Stream:
    """How one param leaf (and its moments) crosses between host and device: whole, one layer of a
    stack at a time (`rows` None), or in `count` chunks of `rows` rows along its first axis."""

    group: int
    count: int = 1
    rows: int | None = None

    def take(self, x, index):
        if self.rows is None:
            return jax.lax.dynamic_index_in_dim(x, index, keepdims=False)
        return jax.lax.dynamic_slice_in_dim(x, index * self.rows, self.rows)

    def put(self, x, value, index):
        if self.rows is None:
            return jax.lax.dynamic_update_index_in_dim(x, value, index, 0)
        return jax.lax.dynamic_update_slice_in_dim(x, value, index * self.rows, 0)


def plan_streams(params: dict, shardings: dict) -> dict:
    """A `Stream` per param leaf (a tree like `params`), from shapes and device shardings.

    Stacked layer weights of three or more dims go one layer at a time. A `[layers, embed]` norm
    scale goes whole: it is tiny, and XLA:TPU tiles the first axis of a 2-D array, so a host DMA
    cannot cut one layer out of it. Any other 2-D weight whose first axis is not sharded (the
    embedding and output head on one device) goes in chunks of whole tiles, each no larger than
    one layer's largest weight, so the update never holds a whole table's state on the device.
    """
    layer_slice = max((math.prod(x.shape[1:]) for x in jax.tree.leaves(params.get(LAYERS, {})) if x.ndim >= 3),
                      default=0)
    next_group = iter(range(LAYER_GROUP + 1, 1 << 20))

    def plan(key, x, sharding):
        if key == LAYERS:
            return Stream(LAYER_GROUP, x.shape[0]) if x.ndim >= 3 else Stream(WHOLE)
        spec = tuple(sharding.spec)
        if x.ndim != 2 or (spec and spec[0] is not None) or not layer_slice:
            return Stream(WHOLE)
        rows = [r for r in range(SUBLANES, x.shape[0], SUBLANES)
                if x.shape[0] % r == 0 and r * x.shape[1] <= layer_slice]
        return Stream(next(next_group), x.shape[0] // rows[-1], rows[-1]) if rows else Stream(WHOLE)

    return {k: jax.tree.map(lambda x, sh, k=k: plan(k, x, sh), v, shardings[k]) for k, v in params.items()}


def _is_stream(x) -> bool:
    return isinstance(x, Stream)


def compute_weights(params: dict, streams: dict, dtype) -> dict:
    """Device copies of the host-resident master `params` in the compute `dtype`, each streamed leaf
    fetched and cast a slice at a time (`plan_streams`), so no float32 copy of it is on the device."""
    leaves, treedef = jax.tree.flatten(params)
    plans = treedef.flatten_up_to(streams)
    out = [_to_device(x).astype(dtype) if plan.group == WHOLE else None for x, plan in zip(leaves, plans, strict=True)]
    for group in sorted({plan.group for plan in plans} - {WHOLE}):
        members = [i for i, plan in enumerate(plans) if plan.group == group]

        def fetch(index, bufs, members=members):
            return [plans[i].put(buf, _to_device(plans[i].take(leaves[i], index)).astype(dtype), index)
                    for i, buf in zip(members, bufs, strict=True)]

        zeros = [_to_device(jnp.zeros(leaves[i].shape, dtype)) for i in members]
        for i, value in zip(members, jax.lax.fori_loop(0, plans[members[0]].count, fetch, zeros), strict=True):
            out[i] = value
    return treedef.unflatten(out)


def global_norm(grads):
    """The float32 L2 norm of all `grads` (of any float dtype), as `optax.tree.norm` of float32 ones."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))


def clip(g, g_norm, max_norm: float):
    """One gradient in float32, clipped as `optax.clip_by_global_norm(max_norm)` does given the
    global norm (0 disables clipping)."""
    g = g.astype(jnp.float32)
    return g if max_norm <= 0 else jnp.where(g_norm < max_norm, g, g / g_norm * max_norm)


def streamed_update(tx: optax.GradientTransformation, grads: dict, opt_state, params: dict, streams: dict,
                    finite, max_norm: float):
    """`(params, opt_state)` after one step of host-resident `params` and `opt_state` with the device
    `grads`, each group of `streams` a slice at a time; both unchanged where `finite` is False.

    `tx` is the optimizer without its clip (`make_optimizer(..., clip=False)`, which keeps the
    state's structure); the clip by the global norm to `max_norm` is applied here, a slice at a
    time. Each `tx.update` sees the whole tree with the leaves outside its slice replaced by
    scalars: AdamW is elementwise, and its schedule and weight-decay mask read only the step count
    and the paths. Each slice is written back into its host array in place (a loop carry).
    """
    g_norm = global_norm(grads)
    p_leaves, p_def = jax.tree.flatten(params)
    g_leaves = p_def.flatten_up_to(grads)
    plans = p_def.flatten_up_to(streams)
    groups = [plan.group for plan in plans]
    s_leaves, s_def = jax.tree.flatten(opt_state)
    # Per state leaf: the group of the param it is a moment of; the step counters go with WHOLE and
    # every group reads them.
    s_groups = s_def.flatten_up_to(optax.tree_map_params(
        tx, lambda _, plan: plan.group, opt_state, streams, transform_non_params=lambda _: WHOLE,
        is_leaf=_is_stream))
    s_param = s_def.flatten_up_to(optax.tree_map_params(tx, lambda _: True, opt_state,
                                                        transform_non_params=lambda _: False))
    placeholder = jnp.zeros((), jnp.float32)

    def pick(values, flags, part):
        return [v for v, f in zip(values, flags, strict=True) if f == part]

    def fill(part_values, flags, part):
        values = iter(part_values)
        return [next(values) if f == part else placeholder for f in flags]

    def update_part(g, p, s, part: int):
        """New `(params, state)` leaves of group `part` from its device values (the gradients
        clipped), the other leaves placeholders and the step counters the current ones."""
        values, counts = iter(s), iter(counters)
        state = s_def.unflatten([next(values) if f == part else (placeholder if param else next(counts))
                                 for f, param in zip(s_groups, s_param, strict=True)])
        full_p = p_def.unflatten(fill(p, groups, part))
        updates, new_state = tx.update(p_def.unflatten(fill(g, groups, part)), state, full_p)
        return (pick(p_def.flatten_up_to(optax.apply_updates(full_p, updates)), groups, part),
                pick(s_def.flatten_up_to(new_state), s_groups, part))

    def select(new, old):
        return [jnp.where(finite, n, o) for n, o in zip(new, old, strict=True)]

    # The leaves moved whole (norm scales, sharded tables) and the step counters.
    p_whole = [_to_device(x) for x in pick(p_leaves, groups, WHOLE)]
    s_whole = [_to_device(x) for x in pick(s_leaves, s_groups, WHOLE)]
    counters = pick(s_whole, [not f for f in pick(s_param, s_groups, WHOLE)], True)
    new_p, new_s = update_part([clip(g, g_norm, max_norm) for g in pick(g_leaves, groups, WHOLE)], p_whole,
                               s_whole, WHOLE)
    new_p_leaves = dict(zip(pick(range(len(p_leaves)), groups, WHOLE), map(_to_host, select(new_p, p_whole))))
    new_s_leaves = dict(zip(pick(range(len(s_leaves)), s_groups, WHOLE), map(_to_host, select(new_s, s_whole))))

    # The streamed groups: one slice of each member's master and moments on the device at a time.
    for group in sorted(set(groups) - {WHOLE}):
        plan = plans[groups.index(group)]
        g_stack = pick(g_leaves, groups, group)

        def step(index, carry, plan=plan, group=group, g_stack=g_stack):
            p_stack, s_stack = carry
            p = [_to_device(plan.take(x, index)) for x in p_stack]
            s = [_to_device(plan.take(x, index)) for x in s_stack]
            new_p, new_s = update_part([clip(plan.take(x, index), g_norm, max_norm) for x in g_stack], p, s, group)
            return ([plan.put(x, _to_host(v), index) for x, v in zip(p_stack, select(new_p, p), strict=True)],
                    [plan.put(x, _to_host(v), index) for x, v in zip(s_stack, select(new_s, s), strict=True)])

        new_p, new_s = jax.lax.fori_loop(0, plan.count, step, (pick(p_leaves, groups, group),
                                                               pick(s_leaves, s_groups, group)))
        new_p_leaves.update(zip(pick(range(len(p_leaves)), groups, group), new_p))
        new_s_leaves.update(zip(pick(range(len(s_leaves)), s_groups, group), new_s))
    return (p_def.unflatten([new_p_leaves[i] for i in range(len(p_leaves))]),
            s_def.unflatten([new_s_leaves[i] for i in range(len(s_leaves))]))
