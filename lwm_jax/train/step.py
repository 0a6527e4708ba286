"""The jitted train step: gradient accumulation over micro-batches, chunked loss, AdamW update,
a guard against non-finite steps, all sharded by the logical-axis rules.

Params and optimizer state are plain nested dicts of arrays (orbax- and optax-friendly), sharded
over `fsdp` and `sp`. A batch is `[grad_accum, batch, seq]` with batch over `(dp, fsdp)` and seq
over `sp`; micro-batches run one at a time in a `lax.scan`, so only one micro-batch of activations
is alive. The loss is the loss-weighted mean NLL over every token of the global step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lwm_jax.config import ModelConfig
from lwm_jax.model.llama import Llama, seed_cotangent
from lwm_jax.parallel.mesh import logical_to_spec, seq_shards, state_shardings
from lwm_jax.train.loss import vocab_parallel_cross_entropy
from lwm_jax.train.offload import (
    HostOffload,
    check_host_memory,
    compute_weights,
    global_norm,
    on_host,
    plan_streams,
    streamed_update,
)

BATCH_KEYS = ("inputs", "positions", "segment_ids", "targets", "loss_weights")


def abstract_model(config: ModelConfig):
    """(graphdef, abstract Param state) of a Llama, without allocating weights."""
    return nnx.split(nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0))))


def init_params(config: ModelConfig, seed: int, mesh: Mesh) -> dict:
    """Random params (pure dict), created directly in their shardings."""
    def init():
        return nnx.to_pure_dict(nnx.state(Llama(config, nnx.Rngs(seed))))

    return jax.jit(init, out_shardings=param_shardings(config, mesh))()


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict:
    _, abstract = abstract_model(config)
    return nnx.to_pure_dict(state_shardings(mesh, abstract))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of `[grad_accum, batch, seq]` arrays."""
    return NamedSharding(mesh, P(None, *logical_to_spec(("batch", "length"), mesh)))


def opt_state_shardings(tx: optax.GradientTransformation, params_shardings: dict, abstract_params: dict,
                        mesh: Mesh):
    """Optimizer-state shardings: moments like their params, counters replicated."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(tx, lambda _, s: s, abstract_state, params_shardings,
                                 transform_non_params=lambda _: replicated)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """The compiled-on-first-call functions of one stage."""

    init_opt_state: Any
    train_step: Any
    params_shardings: dict
    opt_shardings: Any
    batch_sharding: NamedSharding

    def state_targets(self, config: ModelConfig, tx: optax.GradientTransformation):
        """Abstract `(params, opt_state)` in the step's shardings (in host memory with offload): what a
        checkpoint restores into and what the step lowers for."""
        abstract_params = nnx.to_pure_dict(abstract_model(config)[1])

        def place(abstract, shardings):
            return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

        return (place(abstract_params, self.params_shardings),
                place(jax.eval_shape(tx.init, abstract_params), self.opt_shardings))


def _state_placement(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                     offload: HostOffload | None):
    """(params shardings, optimizer-state shardings, streams): on the devices, or with `offload` in
    host memory with the `plan_streams` the step moves them by (else None)."""
    abstract_params = nnx.to_pure_dict(abstract_model(config)[1])
    p_shardings = param_shardings(config, mesh)
    o_shardings = opt_state_shardings(tx, p_shardings, abstract_params, mesh)
    if offload is None:
        return p_shardings, o_shardings, None
    check_host_memory(mesh.devices.flat)
    return on_host(p_shardings), on_host(o_shardings), plan_streams(abstract_params, p_shardings)


def build_step(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
               loss_chunk: int = 2048, document_mask: bool = False,
               offload: HostOffload | None = None, natural_positions: bool = False) -> StepFunctions:
    """Jitted `init_opt_state(params)` and `train_step(params, opt_state, batch)` for one stage.

    `train_step` returns `(params, opt_state, metrics)` with metrics `loss`, `grad_norm`, `tokens`
    (summed loss weights) and `finite` (False when the update was skipped). With `offload`, params
    and optimizer state live in host memory (`params_shardings`, `opt_shardings`) and the step
    runs on their compute-dtype copies, updating them layer by layer (`train.offload`).
    `natural_positions`: every sequence's positions are 0..seq_len-1 (continuous packing); on a mesh
    without sequence shards the attention then runs as one whole causal call (a fused kernel's own
    backward, with no ring accumulators), which is the same computation.
    """
    graphdef, abstract = abstract_model(config)
    p_shardings, o_shardings, streams = _state_placement(config, tx, mesh, offload)
    b_sharding = batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    whole_sequence = natural_positions and seq_shards(mesh) == 1

    def nll_sum(params, micro, layer_grad_acc=None):
        """(nll sum, weight sum), and with `layer_grad_acc` the accumulator carried out of the layers."""
        state = jax.tree.map(lambda x: x, abstract)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state)
        segment_ids = micro["segment_ids"] if document_mask else None
        out = model.forward(micro["inputs"], None if whole_sequence else micro["positions"], segment_ids,
                            layer_grad_acc=layer_grad_acc)  # None: 0..seq_len-1, which the attention can rely on
        nll = vocab_parallel_cross_entropy(out[0], model.output_weights(), micro["targets"],
                                           micro["loss_weights"], loss_chunk)
        return nll if layer_grad_acc is None else (*nll, out[2])

    def train_step(params, opt_state, batch):
        masters = params
        if offload is not None:  # the weights the step computes with: device copies in the compute dtype
            params = compute_weights(masters, streams, jnp.dtype(config.dtype))
        # The loss is normalised by the step's total weight up front (known from the batch), so the
        # gradients come out normalised and no pass over them divides or adds a zero-filled copy.
        weight = jnp.sum(batch["loss_weights"])
        denom = jnp.maximum(weight, 1.0)

        def micro_loss(params, micro):
            return nll_sum(params, micro)[0] / denom

        def micro_loss_into(others, layer_acc, layers, micro):
            """The loss with the layers' gradient accumulated in the backward pass: its gradient
            with respect to `layer_acc` is `layer_acc + the layers' gradient` (`accumulate_into`);
            `seed_cotangent` adds exactly 0.0 to the loss."""
            nll, _, acc_out = nll_sum({**others, "layers": layers}, micro, layer_acc)
            return nll / denom + seed_cotangent(acc_out, layer_acc)

        grad_fn = jax.value_and_grad(micro_loss)
        grad_into = jax.value_and_grad(micro_loss_into, argnums=(0, 1))
        loss, grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
        if batch["inputs"].shape[0] > 1:  # gradient accumulation: the other micro-batches, one at a time
            def micro_step(carry, micro):
                # The layers' gradients are added into the accumulator inside the backward layer
                # scan, one layer at a time (`micro_loss_into`); the rest here. The same sums as
                # `acc + grads`, without the micro-batch's stacked layer gradients beside `acc`.
                total, acc = carry
                others = {k: v for k, v in params.items() if k != "layers"}
                value, (g_others, layers) = grad_into(others, acc["layers"], params["layers"], micro)
                acc = {k: layers if k == "layers" else jax.tree.map(jnp.add, acc[k], g_others[k]) for k in acc}
                return (total + value, acc), None

            (loss, grads), _ = jax.lax.scan(micro_step, (loss, grads), jax.tree.map(lambda x: x[1:], batch))
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(state):
            params, opt_state = state
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A non-finite step is skipped. A `cond` rather than a select of new against old state: the
        # update can then run in place in the donated buffers, without a copy of params and moments.
        # Offloaded, the update selects slice by slice as it streams.
        if offload is not None:
            params, opt_state = streamed_update(offload.tx, grads, opt_state, masters, streams, finite,
                                                offload.clip_norm)
        else:
            params, opt_state = jax.lax.cond(finite, update, lambda state: state, (params, opt_state))
        return params, opt_state, {"loss": loss, "grad_norm": grad_norm, "tokens": weight, "finite": finite}

    batch_shardings = {k: b_sharding for k in BATCH_KEYS}
    metric_shardings = {k: replicated for k in ("loss", "grad_norm", "tokens", "finite")}
    return StepFunctions(
        init_opt_state=jax.jit(tx.init, in_shardings=(p_shardings,), out_shardings=o_shardings),
        train_step=jax.jit(train_step, in_shardings=(p_shardings, o_shardings, batch_shardings),
                           out_shardings=(p_shardings, o_shardings, metric_shardings), donate_argnums=(0, 1)),
        params_shardings=p_shardings,
        opt_shardings=o_shardings,
        batch_sharding=b_sharding,
    )
