"""AdamW with global-norm clipping and a warmup + constant/cosine/linear schedule, from config.

Weight decay skips the RMSNorm scales (as the Hugging Face trainer EasyContext used does). The
moments may be stored in bfloat16 (`moment_dtype`): the update itself runs in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lwm_jax.config import OptimizerConfig
from lwm_jax.train.offload import HostOffload


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate by step: linear warmup, then constant, cosine or linear decay to min_lr_ratio."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    else:
        after = optax.linear_schedule(cfg.lr, end, decay_steps)
    if cfg.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _decay_mask(params):
    """True for weights that get weight decay (everything but norm scales)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any("norm" in str(getattr(k, "key", k)) for k in path), params)


def stored_as(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`inner` with its floating-point state (AdamW's moments) stored in `dtype` between steps and
    computed in float32 within one: optax's `mu_dtype` covers only the first moment."""
    def cast(tree, to):
        return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return cast(inner.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, clip: bool = True) -> optax.GradientTransformation:
    """The stage's AdamW. `clip=False` leaves the global-norm clip to the caller (the offloaded update
    applies it over all gradients before streaming); an identity holds its place in the chain, so
    the state has the same structure either way and checkpoints move between the two."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm) if clip else optax.identity()] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    tx = optax.chain(*parts)
    return tx if cfg.moment_dtype == "float32" else stored_as(tx, jnp.dtype(cfg.moment_dtype))


def make_offload(cfg: OptimizerConfig, total_steps: int) -> HostOffload | None:
    """The host-offloaded update of `optimizer.offload` (None when it is off)."""
    return HostOffload(make_optimizer(cfg, total_steps, clip=False), cfg.clip_norm) if cfg.offload else None
