"""Memory and time planner: per stage and per device, what a recipe needs, on paper and (with
`--aot`) as XLA compiles it on simulated CPU devices (nothing runs).

The analytic model counts, per device: float32 params, AdamW moments and gradients under the
logical sharding rules; the layer inputs the remat policy keeps (one `[batch, seq, embed]` per
layer for `full`, plus the saved matmul outputs for `dots` policies); one layer's recomputed
working set; the ring's KV blocks in flight and float32 accumulators (and, with a `ulysses` axis, the
arrays its all-to-alls receive); one loss chunk of logits;
the weights FSDP gathers (one layer's, and the embedding gradient as a full table); and the batch.
Step time is FLOPs (the MFU convention of `train.metrics`, plus the recompute of `full` remat) at
the given peak and efficiency, against the attention's traffic per axis (`plan.traffic`: the ring's
KV blocks over `sp`, Ulysses' all-to-alls over `ulysses`) and the FSDP weight gathers, each at the
bandwidth of the link its axis uses; the larger of compute and communication is taken (they overlap).

XLA:CPU has no bfloat16 arithmetic: its float-normalization pass runs every bf16 op in float32 and
stores the result as float32, so on the simulated devices of `--aot` each compute-dtype buffer
(saved layer inputs, the layer's working set, the ring's KV blocks) takes 4 bytes per element. The
planner therefore also gives the same model with 4-byte activations (`memory_bytes_per_device_xla_cpu`),
which is what `--aot` is compared with; `memory_bytes_per_device` is the accelerator's figure.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lwm_jax.attention.kernels import Kernel, select_kernel
from lwm_jax.config import MeshConfig, ModelConfig, RecipeConfig
from lwm_jax.errors import UserError
from lwm_jax.hardware import Hardware
from lwm_jax.model.llama import seq_tile_for
from lwm_jax.parallel.mesh import SP, ULYSSES, shard_count
from lwm_jax.planner.traffic import attention_bytes_per_device, axis_link
from lwm_jax.train.metrics import flops_per_token
from lwm_jax.train.schedule import schedule_recipe

GIB = 2**30
# What the planner's figures are held to: the compiler run whose peaks it was fitted against.
CHECKED_AGAINST = ("checked against XLA:TPU (v5p-8 compiles of configs/recipes/gradient_1048k_one_node.yaml: "
                   "the compiler's device memory is 1.00, 0.96, 0.97 and 0.98 of the planner's at 65K, 262K, "
                   "524K and 1048K tokens, and 0.99 at the planner's longest for v5p, 3,407,872 tokens, which "
                   "the compiler accepts; docs/memory.md)")


def param_bytes_per_device(model: ModelConfig, mesh: MeshConfig) -> int:
    """Float32 param bytes one device holds under the logical sharding rules."""
    d, hd, f, v, L = model.hidden_size, model.head_dim, model.intermediate_size, model.vocab_size, model.num_layers
    shapes = [
        ((v, d), ("vocab", "embed")),
        ((L, d, model.num_heads, hd), ("layers", "embed", "heads", "head_dim")),
        ((L, d, model.num_kv_heads, hd), ("layers", "embed", "kv_heads", "head_dim")),
        ((L, d, model.num_kv_heads, hd), ("layers", "embed", "kv_heads", "head_dim")),
        ((L, model.num_heads, hd, d), ("layers", "heads", "head_dim", "embed")),
        ((L, d, f), ("layers", "embed", "mlp")),
        ((L, d, f), ("layers", "embed", "mlp")),
        ((L, f, d), ("layers", "mlp", "embed")),
        ((L, d), ("layers", "norm")),
        ((L, d), ("layers", "norm")),
        ((d,), ("norm",)),
    ]
    if not model.tie_word_embeddings:
        shapes.append(((d, v), ("embed", "vocab")))
    return sum(4 * math.prod(shape) // shard_count(axes, mesh) for shape, axes in shapes)


def layer_param_count(model: ModelConfig) -> int:
    """Params of one decoder layer (attention, MLP, two norms)."""
    d, hd = model.hidden_size, model.head_dim
    return d * hd * (2 * model.num_heads + 2 * model.num_kv_heads) + 3 * d * model.intermediate_size + 2 * d


def layer_bytes_per_device(model: ModelConfig, mesh: MeshConfig) -> int:
    """Float32 bytes of one decoder layer's weights on one device."""
    return param_bytes_per_device(model.replace(num_layers=2), mesh) - param_bytes_per_device(
        model.replace(num_layers=1), mesh)


def memory_per_device(model: ModelConfig, mesh: MeshConfig, seq_len: int, batch_size: int, grad_accum: int,
                      loss_chunk: int, activation_bytes: int | None = None,
                      moment_bytes: int = 4, platform: str = "gpu", offload: bool = False,
                      whole: bool = False) -> dict[str, int]:
    """Analytic device bytes per device by component (see the module docstring) and their `total`;
    the host's are `host_bytes_per_device`.

    `activation_bytes`: bytes per element of compute-dtype activations (default: the model dtype's;
    4 for XLA:CPU, which holds bf16 values as float32). `moment_bytes`: bytes per AdamW moment.
    `platform`: where the step runs (`gpu`, `tpu`, `cpu`), which picks the attention kernel.
    `offload`: `optimizer.offload`, the float32 masters and moments in host memory (`train.offload`).
    `whole`: the attention runs as one whole causal call (`whole_call`), not a ring.
    """
    dt = activation_bytes or np.dtype(model.dtype).itemsize
    d, hd, f, L, v = model.hidden_size, model.head_dim, model.intermediate_size, model.num_layers, model.vocab_size
    hq, hkv = model.num_heads // mesh.tp, model.num_kv_heads // mesh.tp
    b = max(batch_size // (mesh.dp * mesh.fsdp), 1)
    seq_shards = mesh.sp * mesh.ulysses
    s = seq_len // seq_shards
    tokens = b * s
    params = param_bytes_per_device(model, mesh)
    saved_per_layer = {"full": d, "offload": d, "dots": d + hd * (2 * hq + 2 * hkv) + 2 * f + d,
                       "dots_no_batch": d + hd * (2 * hq + 2 * hkv) + 2 * f + d,
                       "none": 3 * d + hd * (3 * hq + 2 * hkv) + 4 * f}[model.remat]
    saved = L * tokens * saved_per_layer * dt
    inputs_on_host = model.remat == "offload"
    # One layer recomputed in the backward pass, values and cotangents: over the whole local sequence
    # only what the attention itself needs (the layer input, q/k/v and the output); the per-token work
    # around it (norm and projections before, projection, norm and MLP after) one tile at a time.
    attention_work = 2 * tokens * (d + hd * (2 * hq + 2 * hkv)) * dt
    tile_work = 2 * b * seq_tile_for(model, s) * (2 * d + 3 * f) * dt  # norm in and out, gate/up/hidden
    # Ring: K/V blocks held and in flight (forward and backward), dK/dV float32 accumulators and the
    # ones in flight, and the queries' float32 accumulator with its log-sum-exp: the output's in the
    # (recomputed) forward ring, dQ's in the backward ring, one at a time. After the Ulysses exchange
    # a device runs the ring on the sp shard's tokens for its 1/ulysses of the heads (of the KV heads,
    # or the one it needs when there are fewer), and holds what the all-to-alls received.
    ring_tokens = b * (seq_len // mesh.sp)
    hq_ring, hkv_ring = hq // mesh.ulysses, max(hkv // mesh.ulysses, 1)
    ring_kv = ring_tokens * hkv_ring * hd * 4 * dt
    ring_dkv = ring_tokens * hkv_ring * hd * 4 * 4
    ring_q = ring_tokens * hq_ring * (hd + 1) * 4
    exchange = ring_tokens * (2 * hq_ring + 2 * hkv_ring) * hd * dt if mesh.ulysses > 1 else 0
    if whole:  # a fused kernel's whole call: nothing in flight, no float32 accumulators, its log-sum-exp
        ring_kv, ring_dkv, ring_q = 0, 0, ring_tokens * hq_ring * 4
    # The pure-JAX kernel's float32 score blocks `[heads, tile, tile]` (scores and probabilities, or
    # their cotangents), two alive at once; the tile is the ring's block on an accelerator (XLA:TPU
    # compiles of the 8B recipe: +0.9 GiB at 65K and +1.9 GiB at 1048K going from tile 256 to 2048).
    # A fused kernel keeps its tiles on chip (XLA:TPU, 65K: the Pallas kernel's step 1.1 GiB lower).
    tile = min(model.attention_block_size, max(seq_len // (2 * mesh.sp), 1))
    scores = 2 * b * hq_ring * tile * tile * 4 if _score_blocks(model, platform) else 0
    # Loss: the output projection split by vocabulary over the weight shards (fsdp, sp, ulysses, tp),
    # float32 [embed, vocab/N] and its gradient; each chunk's float32 logits for the group's tokens.
    # Without such a split the projection is gathered whole (and its gradient with it).
    ways = mesh.fsdp * seq_shards * mesh.tp
    split = ways > 1 and v % ways == 0 and seq_len % seq_shards == 0
    chunk = min(loss_chunk, seq_len)
    if split:
        head = 2 * d * (v // ways) * 4
        loss = b * mesh.fsdp * chunk * (v // ways) * 4  # its cotangent is formed in the same fusion
    else:
        head = 2 * d * v * 4 if ways > 1 else 0
        loss = 2 * b * max(chunk // seq_shards, 1) * v * 4
    # The stacked layer weights in the compute dtype: XLA moves the cast of each layer's weights
    # (narrowing, so moved above the scan's dynamic slice) out of the layer and micro-batch scans, one
    # cast of every layer's weights alive for the whole step. (Measured with XLA:TPU: an optimization
    # barrier does not stop it, TPU strips barriers first.) With a float32 model there is no cast.
    shards = mesh.fsdp * seq_shards
    cast = dt if dt < 4 and np.dtype(model.dtype).itemsize < 4 else 0
    weights_cast = L * layer_param_count(model) * cast // (shards * mesh.tp)
    # One float32 gradient buffer: the accumulator, into which the backward layer scan adds each
    # layer's gradient in place (`train.step`); without accumulation, the gradient. The layer being
    # computed has its weights all-gathered, and the embedding is looked up on its own shards; at the
    # peak (the layer backward, XLA:TPU) neither is alive, so neither is counted.
    out = {"params": params, "optimizer": 2 * params * moment_bytes // 4,
           "gradients": params, "weights_cast": weights_cast,
           **(_offloaded_state(model, mesh, dt, moment_bytes) if offload else {}),
           "activations": 2 * tokens * d * dt if inputs_on_host else saved,  # two layers' inputs in flight
           "layer_recompute": attention_work + tile_work,
           "ring_kv": ring_kv, "ring_dkv": ring_dkv, "ring_q": ring_q, "ulysses_exchange": exchange,
           "attention_scores": scores, "loss_chunk": loss, "output_head": head,
           "batch": 5 * grad_accum * tokens * 4}
    out["total"] = sum(out.values())
    return out


def whole_call(model: ModelConfig, mesh: MeshConfig, packing: str, platform: str) -> bool:
    """Whether a stage's attention runs as one whole causal call on `platform` (`train.step`, natural
    positions): the ring on a mesh without sequence shards, over continuously packed sequences, with
    a kernel that has such a call (cuDNN's on GPU; TPU's Pallas kernel runs it as the one-device ring)."""
    if model.attention != "ring" or mesh.sp * mesh.ulysses != 1 or packing != "continuous":
        return False
    try:
        kernel = select_kernel(model.attention_kernel, dtype=np.dtype(model.dtype), head_dim=model.head_dim,
                               segments=False, whole=True, platform=platform)
    except UserError:
        return False
    return type(kernel).attention is not Kernel.attention


def _offloaded_state(model: ModelConfig, mesh: MeshConfig, dt: int, moment_bytes: int) -> dict[str, int]:
    """The device's share of weights and optimizer state with `optimizer.offload`: the compute-dtype
    copy of every weight and its gradient, and the update's one slice at a time: a layer's float32
    masters, moments, clipped gradient and new masters (the embedding and head go in chunks no
    larger than a layer's largest weight, so a layer bounds them)."""
    weights = param_bytes_per_device(model, mesh) * dt // 4
    return {"params": weights, "gradients": weights, "weights_cast": 0,
            "optimizer": layer_bytes_per_device(model, mesh) * (12 + 2 * moment_bytes) // 4}


def _score_blocks(model: ModelConfig, platform: str) -> bool:
    """Whether the ring's kernel on `platform` is the pure-JAX one, whose score blocks live in HBM."""
    try:
        kernel = select_kernel(model.attention_kernel, dtype=np.dtype(model.dtype), head_dim=model.head_dim,
                               segments=False, platform=platform)
    except UserError:  # a kernel named for another platform: planned as the portable one
        return True
    return kernel.name == "xla"


def host_bytes_per_device(model: ModelConfig, mesh: MeshConfig, seq_len: int, batch_size: int,
                          activation_bytes: int | None = None, offload: bool = False, moment_bytes: int = 4) -> int:
    """Host memory per device: the layer inputs the `offload` remat policy keeps there, and with
    `optimizer.offload` the float32 masters and the moments."""
    state = param_bytes_per_device(model, mesh) * (4 + 2 * moment_bytes) // 4 if offload else 0
    if model.remat != "offload":
        return state
    dt = activation_bytes or np.dtype(model.dtype).itemsize
    b = max(batch_size // (mesh.dp * mesh.fsdp), 1)
    return state + model.num_layers * b * (seq_len // (mesh.sp * mesh.ulysses)) * model.hidden_size * dt


def host_link_seconds(model: ModelConfig, mesh: MeshConfig, hw: Hardware, moment_bytes: int = 4) -> float:
    """Seconds per step on the host link with `optimizer.offload`: every float32 master read once for
    the compute weights, and masters and moments read and written back by the update. The update runs
    after the backward pass, so this adds to the step rather than overlapping it."""
    params = param_bytes_per_device(model, mesh) // 4
    return params * (4 + 2 * (4 + 2 * moment_bytes)) / (hw.host_gbps * 1e9)


def step_seconds(model: ModelConfig, mesh: MeshConfig, seq_len: int, batch_size: int, grad_accum: int,
                 hw: Hardware, offload: bool = False, moment_bytes: int = 4) -> dict[str, Any]:
    """Estimated seconds per optimizer step: compute vs. ring, Ulysses and FSDP communication
    (`traffic`: bytes, link and seconds per sequence axis), plus with `offload` the optimizer
    state's trips over the host link (`host_link_seconds`)."""
    devices = math.prod(mesh.shape)
    tokens = seq_len * batch_size * grad_accum
    recompute = 8 / 6 if model.remat in ("full", "offload") else 1.0
    flops = flops_per_token(model, seq_len) * tokens * recompute
    compute = flops / (devices * hw.peak_tflops * 1e12 * hw.efficiency)
    dt = np.dtype(model.dtype).itemsize
    b = max(batch_size // (mesh.dp * mesh.fsdp), 1)
    # Per layer: the attention's traffic forward (twice under remat: the backward recomputes it) and
    # backward, on each sequence axis at its link's bandwidth.
    traffic = attention_bytes_per_device(seq_len, model.num_heads // mesh.tp, model.num_kv_heads // mesh.tp,
                                         model.head_dim, dt, mesh.sp, mesh.ulysses)
    per_axis = {}
    for scheme in ("ring", "ulysses"):
        t = traffic[scheme]
        moved = model.num_layers * b * grad_accum * (t["forward_bytes"] * (2 if recompute > 1 else 1)
                                                     + t["backward_bytes"])
        link = axis_link(mesh, t["axis"], hw.devices_per_node)
        gbps = hw.inter_node_gbps if link == "inter-node" else hw.intra_node_gbps
        per_axis[t["axis"]] = {"scheme": scheme, "bytes_per_step": moved, "link": link, "gbps": gbps,
                               "seconds": moved / (gbps * 1e9)}
    ring, ulysses = per_axis[SP]["seconds"], per_axis[ULYSSES]["seconds"]
    shards = mesh.fsdp * mesh.sp * mesh.ulysses
    weights = param_bytes_per_device(model, mesh) * shards * dt / 4
    fsdp_bytes = 3 * weights * (shards - 1) / shards * grad_accum  # gather fwd, gather bwd, reduce-scatter
    fsdp_link = hw.inter_node_gbps if shards > hw.devices_per_node else hw.intra_node_gbps
    fsdp = fsdp_bytes / (fsdp_link * 1e9) if shards > 1 else 0.0
    host = host_link_seconds(model, mesh, hw, moment_bytes) if offload else 0.0
    return {"compute_s": compute, "ring_s": ring, "ulysses_s": ulysses, "fsdp_s": fsdp, "host_link_s": host,
            "step_s": max(compute, ring + ulysses + fsdp) + host, "flops": flops, "traffic": per_axis}


def plan_stage(model: ModelConfig, mesh: MeshConfig, seq_len: int, batch_size: int, grad_accum: int, steps: int,
               loss_chunk: int, hw: Hardware, moment_bytes: int = 4, offload: bool = False,
               whole: bool = False) -> dict[str, Any]:
    """The plan of one stage: memory by component (device and host apart), whether it fits (the
    device's memory and the host's share of RAM both), time."""
    memory = memory_per_device(model, mesh, seq_len, batch_size, grad_accum, loss_chunk, moment_bytes=moment_bytes,
                               platform=hw.platform, offload=offload, whole=whole)
    xla_cpu = memory_per_device(model, mesh, seq_len, batch_size, grad_accum, loss_chunk, activation_bytes=4,
                                moment_bytes=moment_bytes, platform="cpu", offload=offload)  # no whole call on XLA:CPU
    time = step_seconds(model, mesh, seq_len, batch_size, grad_accum, hw, offload, moment_bytes)
    host = host_bytes_per_device(model, mesh, seq_len, batch_size, offload=offload, moment_bytes=moment_bytes)
    host_fits = host <= hw.host_memory_gib * GIB
    # XLA:CPU keeps host-offloaded buffers in ordinary memory, so its figure holds both.
    return {"memory": memory, "memory_bytes_per_device": memory["total"], "host_bytes_per_device": host,
            "memory_bytes_per_device_xla_cpu": xla_cpu["total"] + host_bytes_per_device(
                model, mesh, seq_len, batch_size, 4, offload, moment_bytes),
            "fits": memory["total"] <= hw.memory_gib * GIB and host_fits, "host_fits": host_fits,
            "step_s": time["step_s"], "time": time,
            "estimated_minutes": time["step_s"] * steps / 60}


def length_unit(model: ModelConfig, mesh: MeshConfig) -> int:
    """The step between the long sequence lengths the stage's attention accepts on `mesh`."""
    shards = mesh.sp * mesh.ulysses
    if model.attention == "ring":
        return math.lcm(2 * mesh.sp * model.attention_block_size, shards)
    if model.attention == "blockwise":
        return math.lcm(model.attention_block_size, shards)
    return shards


def longest_fitting(model: ModelConfig, mesh: MeshConfig, batch_size: int, grad_accum: int, loss_chunk: int,
                    hw: Hardware, moment_bytes: int = 4, offload: bool = False, whole: bool = False) -> int:
    """The longest `seq_len`, a multiple of `length_unit`, whose device memory fits `hw` and whose
    host memory (offloaded layer inputs, optimizer state) fits a device's share of the host's RAM
    (0: none)."""
    unit = length_unit(model, mesh)
    limit, host_limit = hw.memory_gib * GIB, hw.host_memory_gib * GIB

    def fits(n: int) -> bool:
        host = host_bytes_per_device(model, mesh, n * unit, batch_size, offload=offload, moment_bytes=moment_bytes)
        return host <= host_limit and memory_per_device(
            model, mesh, n * unit, batch_size, grad_accum, loss_chunk, moment_bytes=moment_bytes,
            platform=hw.platform, offload=offload, whole=whole)["total"] <= limit

    if not fits(1):
        return 0
    hi = 1
    while fits(2 * hi) and hi < 2**40 // unit:
        hi *= 2
    lo, hi = hi, 2 * hi  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * unit


def plan_recipe(recipe: RecipeConfig, hw: Hardware, devices: int | None = None,
                       only_stage: str | None = None, max_seq_len: bool = False) -> list[dict[str, Any]]:
    """One analytic plan per stage, each on its own mesh (or all on `devices`); with `only_stage`,
    that stage's alone (the other stages' meshes are not checked); with `max_seq_len`, each entry
    also gives the longest sequence that fits the stage's devices (`longest_fitting`) and the host
    memory per device it needs."""
    if only_stage is not None:
        recipe.stage(only_stage)  # an unknown name is an error, not an empty plan
    out = []
    for plan in schedule_recipe(recipe, devices, check_sources=False, only_stage=only_stage):
        stage = plan.stage
        moment_bytes = np.dtype(stage.optimizer_config.moment_dtype).itemsize
        offload = stage.optimizer_config.offload
        whole = whole_call(plan.model, plan.mesh, recipe.data.packing if recipe.data else "continuous", hw.platform)
        result = plan_stage(plan.model, plan.mesh, stage.seq_len, stage.batch_size, stage.grad_accum, stage.steps,
                            recipe.loss_chunk, hw, moment_bytes, offload, whole)
        out.append({"name": plan.name, "seq_len": stage.seq_len, "devices": math.prod(plan.mesh.shape),
                    "mesh": plan.mesh.spec(), "remat": plan.model.remat, **result})
        if max_seq_len:
            longest = longest_fitting(plan.model, plan.mesh, stage.batch_size, stage.grad_accum,
                                      recipe.loss_chunk, hw, moment_bytes, offload, whole)
            out[-1].update(max_seq_len=longest, max_seq_len_host_bytes_per_device=host_bytes_per_device(
                plan.model, plan.mesh, longest, stage.batch_size, offload=offload, moment_bytes=moment_bytes))
    return out
