"""`lwm-jax doctor`: what these devices give a run, measured in seconds before hours are spent.

It reports the devices and processes JAX sees, the library versions, the attention kernel `auto`
picks (and why each other kernel can or cannot run), the measured matmul rate and the `ppermute`
and `all_to_all` bandwidth over each mesh axis against the planner's hardware table, the free
device memory and, for a recipe, whether a stage's plan fits these devices.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.metadata
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lwm_jax.attention.kernels import get_kernel, kernel_names, select_kernel
from lwm_jax.config import MESH_AXES, MeshConfig, RecipeConfig, load_recipe
from lwm_jax.errors import UserError
from lwm_jax.hardware import HARDWARE, Hardware, hardware_for_device
from lwm_jax.parallel.mesh import make_mesh
from lwm_jax.planner import GIB, plan_recipe, resolve_hardware
from lwm_jax.train.metrics import measured_matmul_flops

VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")
PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")  # reported when installed
ACCELERATOR_MATMUL = 8192  # bf16 [n, n] @ [n, n]: 1.1 TFLOP, about 1.5 ms on an H100
LINK_BYTES = {"cpu": 1 << 20, "accelerator": 64 << 20}  # per device and collective
REPEATS = 5  # timed calls per measurement, the best is kept (after one compile-and-warm-up call)

# Every key of the JSON object, documented once (the CLI's --help epilog and the README use this).
JSON_KEYS = {
    "platform": "JAX's default backend: cpu, gpu or tpu",
    "devices": "{kind, count (all processes), local (this process), per_process: {index: count}}",
    "processes": "{count, index} of the process that printed (process 0)",
    "versions": "installed versions of jax, jaxlib, flax, optax, orbax-checkpoint, grain (null when "
                "absent) and of the CUDA/TPU plugins that are installed",
    "hardware": "{name, source}: the planner's hardware table entry compared against (name null, "
                "with the reason, where the device kind has none and --hardware names none)",
    "attention_kernel": "{name, whole_call, reason, call: {dtype, head_dim, segments}}: what kernel='auto' picks "
                        "here for ring and Ulysses steps (name) and for calls that merge nothing (whole_call)",
    "kernels": "{name: {can_run, reason, platforms}} for every kernel in the registry",
    "matmul_tflops": "{measured, peak, fraction, peak_source, dtype, n}: dense matmul rate on one local "
                     "device (bf16 on accelerators, float32 on CPU) against the hardware table's dense bf16 "
                     "peak (null where no table has the device)",
    "mesh": "the mesh the links were measured on (--mesh, else sp over all devices)",
    "links": "{axis: {size, bytes_per_device, ppermute_gbps, all_to_all_gbps, assumed_gbps, link}} for "
             "each mesh axis of size > 1: measured GB/s (bytes one device sends / seconds) against "
             "the planner's intra- or inter-node bandwidth for that axis (null without a table entry)",
    "memory": "{free_bytes, bytes_limit (smallest over this process's devices), per_device, reason}; "
              "null figures with a reason where the backend reports no memory_stats()",
    "plan": "with --recipe: per stage {name, seq_len, mesh, memory_bytes_per_device, device_memory_bytes, "
            "memory_source, fits, step_s, host_bytes_per_process, host_memory_bytes, host_fits} on these "
            "devices; else null",
}


def versions() -> dict[str, str | None]:
    """Installed distribution versions (None when absent); plugins only when installed."""
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    out = {name: version(name) for name in VERSIONS}
    out.update({name: v for name in PLUGINS if (v := version(name)) is not None})
    return out


def hardware_entry(device_kind: str, name: str | None = None) -> tuple[Hardware | None, str]:
    """(the hardware table's entry for this device kind or for `name`, where it came from)."""
    if name is not None:
        return resolve_hardware(name), f"--hardware {name}"
    hw = hardware_for_device(device_kind)
    if hw is not None:
        return hw, f"table entry {hw.name!r} (device kind {device_kind!r})"
    return None, (f"no hardware table entry for device kind {device_kind!r} (entries: {', '.join(HARDWARE)}); "
                  "--hardware NAME compares against one")


def kernel_report(platform: str, dtype, head_dim: int, segments: bool = False) -> tuple[dict, dict]:
    """(what `auto` picks for this call and why, {kernel: whether it can run here and why not})."""
    kernels = {}
    for name in kernel_names():
        kernel = get_kernel(name)
        if kernel.platforms and platform not in kernel.platforms:
            reason = f"runs on {'/'.join(kernel.platforms)}, not on {platform}"
        else:
            reason = kernel.supports(dtype=dtype, head_dim=head_dim, segments=segments)
        kernels[name] = {"can_run": reason is None, "reason": reason,
                         "platforms": list(kernel.platforms) or "all"}
    pick = lambda whole: select_kernel("auto", dtype=dtype, head_dim=head_dim, segments=segments, whole=whole,
                                       platform=platform).name
    chosen, whole = pick(False), pick(True)
    others = [f"{n}: {k['reason']}" for n, k in kernels.items() if n not in (chosen, whole) and not k["can_run"]]
    unused = [n for n, k in kernels.items() if n not in (chosen, whole, "xla") and k["can_run"]]
    if chosen != "xla":
        reason = f"ring and Ulysses steps: the fused {chosen} kernel supports this call on {platform}"
    else:
        reason = "ring and Ulysses steps: the portable pure-JAX kernel, no fused kernel runs this call here" + (
            f" ({'; '.join(others)})" if others else "")
    reason += (f"; whole calls (one sequence shard, no packed documents): {whole}" if whole != chosen else
               "; whole calls the same")
    if unused:
        reason += f"; {', '.join(unused)} can run, but auto does not pick it on {platform} (name it to use it)"
    call = {"dtype": jnp.dtype(dtype).name, "head_dim": head_dim, "segments": segments}
    return {"name": chosen, "whole_call": whole, "reason": reason, "call": call}, kernels


def _best_seconds(fn, *args, repeats: int = REPEATS) -> float:
    """Best wall time of `repeats` calls of a jitted `fn`, after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def matmul_report(platform: str, hw: Hardware | None) -> dict:
    """The measured dense matmul rate of one local device against the table's peak (TFLOP/s)."""
    if platform == "cpu":
        measured, dtype, n = measured_matmul_flops(), "float32", 1024  # what MFU divides by on CPU
    else:
        n, dtype = ACCELERATOR_MATMUL, "bfloat16"
        a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16), jax.local_devices()[0])
        measured = 2.0 * n**3 / _best_seconds(jax.jit(lambda x: x @ x), a)
    kind = jax.local_devices()[0].device_kind
    if hw is not None:
        peak, source = hw.peak_tflops, f"hardware table ({hw.name})"
    else:
        peak, source = None, f"no table entry for {kind!r}"
    return {"measured": measured / 1e12, "peak": peak, "fraction": measured / 1e12 / peak if peak else None,
            "peak_source": source, "dtype": dtype, "n": n}


def _link_kind(mesh, axis: str, hw: Hardware) -> str:
    """'inter-node' when a device group along `axis` spans nodes: devices are counted process by
    process (one or more processes per node, each with the same number of devices) and every
    `hw.devices_per_node` of them form a node."""
    ordinal = {d: i for i, d in enumerate(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))}
    groups = np.moveaxis(mesh.devices, mesh.axis_names.index(axis), -1).reshape(-1, mesh.shape[axis])
    spans = any(len({ordinal[d] // hw.devices_per_node for d in group}) > 1 for group in groups)
    return "inter-node" if spans else "intra-node"


@functools.partial(jax.jit, static_argnames=("mesh", "axis", "op"))
def _collective(x, *, mesh, axis: str, op: str):
    """`ppermute` (each device to the next along `axis`) or `all_to_all` of each device's block."""
    size = mesh.shape[axis]

    def local(block):  # block: [1, 1, 1, 1, n]
        if op == "ppermute":
            return jax.lax.ppermute(block, axis, perm=[(i, (i + 1) % size) for i in range(size)])
        parts = block.reshape(size, -1)
        return jax.lax.all_to_all(parts, axis, split_axis=0, concat_axis=0, tiled=True).reshape(block.shape)

    spec = P(*MESH_AXES, None)
    return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec)(x)


def link_report(mesh, hw: Hardware | None, nbytes: int) -> dict:
    """Measured `ppermute` and `all_to_all` GB/s over each mesh axis of size > 1 against the
    planner's assumed bandwidth; every process must call this (the collectives span them all)."""
    n = -(-max(nbytes // 4, 1) // mesh.size) * mesh.size  # all_to_all splits a block over any axis
    block_shape = (1,) * len(MESH_AXES) + (n,)
    x = jax.make_array_from_callback((*mesh.devices.shape, n), NamedSharding(mesh, P(*MESH_AXES, None)),
                                     lambda index: np.ones(block_shape, np.float32))
    block = 4 * n
    out = {}
    for axis in MESH_AXES:
        size = mesh.shape[axis]
        if size == 1:
            continue
        sent = {"ppermute": block, "all_to_all": block * (size - 1) // size}
        rates = {op: sent[op] / _best_seconds(functools.partial(_collective, mesh=mesh, axis=axis, op=op), x) / 1e9
                 for op in sent}
        link = _link_kind(mesh, axis, hw) if hw is not None else None
        assumed = None if hw is None else hw.inter_node_gbps if link == "inter-node" else hw.intra_node_gbps
        out[axis] = {"size": size, "bytes_per_device": block, "ppermute_gbps": rates["ppermute"],
                     "all_to_all_gbps": rates["all_to_all"], "assumed_gbps": assumed, "link": link}
    return out


def memory_report() -> dict:
    """Free and total bytes of this process's devices as the runtime reports them."""
    per_device = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats()
        except Exception:  # some plugins raise instead of returning None
            stats = None
        if not stats or "bytes_limit" not in stats:
            continue
        limit, used = int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))
        per_device.append({"device": device.id, "bytes_limit": limit, "bytes_in_use": used,
                           "free_bytes": limit - used})
    if not per_device:
        platform = jax.local_devices()[0].platform
        return {"free_bytes": None, "bytes_limit": None, "per_device": [],
                "reason": f"the {platform} backend reports no memory_stats()"}
    return {"free_bytes": min(d["free_bytes"] for d in per_device),
            "bytes_limit": min(d["bytes_limit"] for d in per_device), "per_device": per_device, "reason": None}


def _host_memory() -> int:
    """The host's physical RAM in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _host_memory_per_device() -> int:
    """The host's RAM divided over its local devices (what a simulated CPU device can hold)."""
    return _host_memory() // jax.local_device_count()


def stage_plans(recipe: RecipeConfig, stage: str | None, hw: Hardware | None, memory: dict) -> list[dict]:
    """The analytic plan of the recipe's stage (or of every stage) on these devices."""
    if memory["bytes_limit"] is not None:
        device_memory, source = memory["bytes_limit"], "memory_stats() bytes_limit"
    elif jax.default_backend() == "cpu":
        device_memory, source = _host_memory_per_device(), "host RAM / local devices"
    else:
        device_memory, source = int(hw.memory_gib * GIB), f"hardware table ({hw.name})"
    base = hw or HARDWARE["L40S"]  # the planner's default device, for the step-time estimate
    planned_hw = dataclasses.replace(base, memory_gib=device_memory / GIB)
    out = []
    host_ram = _host_memory()
    for plan in plan_recipe(recipe, planned_hw, jax.device_count(), stage):
        # What this process keeps in host memory (offloaded optimizer state and layer inputs of its
        # local devices) against the machine's RAM.
        host = plan["host_bytes_per_device"] * jax.local_device_count()
        out.append({"name": plan["name"], "seq_len": plan["seq_len"], "mesh": plan["mesh"],
                    "memory_bytes_per_device": plan["memory_bytes_per_device"], "device_memory_bytes": device_memory,
                    "memory_source": source, "fits": plan["fits"], "step_s": plan["step_s"],
                    "step_s_hardware": base.name, "host_bytes_per_process": host, "host_memory_bytes": host_ram,
                    "host_fits": host <= host_ram})
    return out


def run_doctor(mesh_config: MeshConfig | None = None, *, recipe: str | None = None, stage: str | None = None,
               hardware: str | None = None, link_bytes: int | None = None) -> dict:
    """Everything `lwm-jax doctor` reports, as one JSON-ready dict (keys: `JSON_KEYS`).

    Every process of a multi-process run must call it (the link measurements are collectives).
    """
    if stage is not None and recipe is None:
        raise UserError("--stage needs --recipe RECIPE.yaml")
    loaded = load_recipe(recipe) if recipe is not None else None  # bad input fails before any measurement
    if stage is not None and stage not in (names := [s.name for s in loaded.stages]):
        raise UserError(f"--stage {stage!r} is not a stage of {recipe} (stages: {names})")
    platform = jax.default_backend()
    devices = jax.devices()
    kind = devices[0].device_kind
    hw, hw_source = hardware_entry(kind, hardware)
    mesh_config = mesh_config or MeshConfig(sp=len(devices))
    mesh = make_mesh(mesh_config)
    if loaded is not None:
        dtype, head_dim = loaded.model.dtype, loaded.model.head_dim
    else:  # a Llama-3 call in the dtype a run uses here
        dtype, head_dim = ("float32" if platform == "cpu" else "bfloat16"), 128
    auto, kernels = kernel_report(platform, dtype, head_dim)
    per_process = dict(collections.Counter(d.process_index for d in devices))
    memory = memory_report()
    plans = stage_plans(loaded, stage, hw, memory) if loaded is not None else None
    nbytes = link_bytes or LINK_BYTES["cpu" if platform == "cpu" else "accelerator"]
    return {
        "platform": platform,
        "devices": {"kind": kind, "count": len(devices), "local": jax.local_device_count(),
                    "per_process": per_process},
        "processes": {"count": jax.process_count(), "index": jax.process_index()},
        "versions": versions(),
        "hardware": {"name": None if hw is None else hw.name, "source": hw_source},
        "attention_kernel": auto,
        "kernels": kernels,
        "matmul_tflops": matmul_report(platform, hw),
        "mesh": mesh_config.resolve(len(devices)).spec(),
        "links": link_report(mesh, hw, nbytes),
        "memory": memory,
        "plan": plans,
    }
