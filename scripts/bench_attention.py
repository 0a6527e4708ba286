"""Attention benchmark: our zigzag ring against the `ringattention` package (0.1.2, the Large World
Model's kernel) and dense XLA attention, causal forward + backward on 8 simulated CPU devices.

In one process, timings are interleaved (matmul, ours, ringattention, dense, then again) because
this machine's load varies; ratios are per round, reported as medians, from wall time and, as a
check less disturbed by other processes, from process CPU time. It also prints the ring's
per-device computed block pairs and XLA's per-device temp memory at longer sequences. On a GPU
(`--gpu`, default when one is present) it times our local kernel against cuDNN attention at
Llama-3-8B head shapes instead. Human table first; with `--json` the last line is one JSON object.

`ringattention` is a bench-only dependency: `pip install --no-deps ringattention==0.1.2 einops`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CPU_DEVICES = 8
SPEEDUP_TARGET = 1.5  # ours against ringattention 0.1.2
MATMUL_FRACTION_TARGET = 0.5  # useful causal FLOP/s against the same run's float32 matmul rate
GPU_TARGET = 0.9  # our local kernel against cuDNN attention, fwd + bwd
# The chunk length LWM's own configs give ringattention for the LWM models (scan_query_chunk_size =
# scan_key_chunk_size = 1024). It gives the ~35% of the matmul rate that the issue measured; at
# 512 (our block) ringattention reaches 54-63% here, and --anchor-block 512 reports that ratio.
ANCHOR_BLOCK = 1024


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=512, help="our ring's block length")
    p.add_argument("--anchor-block", type=int, default=ANCHOR_BLOCK,
                   help="ringattention's query and key chunk length (default %(default)s, the Large World "
                        "Model's scan_query_chunk_size / scan_key_chunk_size for its released models)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--memory-seqs", default="32768,65536,131072",
                   help="sequence lengths whose compiled per-device temp memory is reported")
    p.add_argument("--no-anchor", action="store_true", help="skip ringattention (not installed)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference")
    p.add_argument("--gpu", action="store_true", help="GPU mode (default when a GPU is present)")
    p.add_argument("--gpu-seq", type=int, default=65536)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


def causal_flops(batch, seq, heads, head_dim):
    """Useful FLOPs of causal attention forward + backward: 2 matmuls forward, 5 backward
    (FlashAttention's count), each `2 * head_dim` per visible (query, key) pair and head."""
    return 7 * 2 * batch * heads * head_dim * seq * (seq + 1) / 2


def _time(fn, *args):
    """(wall seconds, process CPU seconds) of one call."""
    import jax

    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - wall, time.process_time() - cpu


def _interleaved(fns: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds per call of each function, A B C A B C ...: one call each per round."""
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, args) in fns.items():
            w, c = _time(fn, *args)
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def _grad_fn(attn):
    """jit of `(q, k, v, dout) -> (dq, dk, dv)` for `attn(q, k, v) -> out`."""
    import jax
    import jax.numpy as jnp

    def loss(q, k, v, dout):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * dout)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _anchor_attention(mesh, block: int, group: int):
    """ringattention 0.1.2 as the Large World Model calls it: K/V repeated to the query heads,
    natural order, causal_block_size=1, inside shard_map over `sp`."""
    import importlib
    from functools import partial

    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    # The package reads `jax.lib.xla_bridge` at import time; current JAX moved it.
    importlib.import_module("jax.lib").xla_bridge = importlib.import_module("jax._src.xla_bridge")
    from ringattention import ringattention_jax

    kwargs = dict(causal_block_size=1, deterministic=True, dropout_rng=None, attn_pdrop=0.0,
                  query_chunk_size=block, key_chunk_size=block, dtype=jnp.float32,
                  policy=jax.checkpoint_policies.nothing_saveable, precision=None,
                  prevent_cse=False)  # LWM passes `not scan_layers`, and its configs scan the layers
    spec = P(None, "sp", None, None)
    sharded = jax.shard_map(
        partial(ringattention_jax, axis_name="sp", float32_logits=True, cache_idx=None, blockwise_kwargs=kwargs),
        mesh=mesh, in_specs=(spec, spec, spec, None, None), out_specs=spec, check_vma=False)

    def attn(q, k, v):
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        return sharded(q, k, v, None, None)

    return attn


def bench_cpu(args) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lwm_jax.attention.kernels.xla import compute_tile
    from lwm_jax.attention.layout import to_zigzag
    from lwm_jax.attention.reference import reference_attention
    from lwm_jax.attention.ring import causal_min_block_pairs, ring_attention, ring_block, ring_block_pairs
    from lwm_jax.config import MeshConfig
    from lwm_jax.parallel.mesh import make_mesh

    sp = len(jax.devices())
    mesh = make_mesh(MeshConfig(sp=sp))
    seq, h, kv, d = args.seq, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    shapes = [(1, seq, h, d), (1, seq, kv, d), (1, seq, kv, d), (1, seq, h, d)]
    natural = [jax.random.normal(key, shape, jnp.float32) for key, shape in zip(keys, shapes)]
    seq_sharding = NamedSharding(mesh, P(None, "sp", None, None))
    nat = [jax.device_put(x, seq_sharding) for x in natural]
    zig = [jax.device_put(to_zigzag(x, sp), seq_sharding) for x in natural]

    # The machine's float32 matmul rate, run the way the attention runs: one product per device.
    # Order matmul, ours, ringattention, dense: each ratio compares neighbouring calls.
    n = 2048
    mats = jax.device_put(jax.random.normal(keys[0], (sp, n, n), jnp.float32),
                          NamedSharding(mesh, P("sp", None, None)))
    fns = {"matmul": (jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a)), [mats]),
           "ours": (_grad_fn(lambda q, k, v: ring_attention(q, k, v, block_size=args.block)), zig)}
    if not args.no_anchor:
        fns["ringattention"] = (_grad_fn(_anchor_attention(mesh, min(args.anchor_block, seq // sp), h // kv)), nat)
    if not args.no_dense:
        fns["dense"] = (_grad_fn(reference_attention), nat)
    matmul_flops = 2 * sp * n**3

    with jax.set_mesh(mesh):
        for fn, fn_args in fns.values():  # compile and warm up
            jax.block_until_ready(fn(*fn_args))
        times, cpu_times = _interleaved(fns, args.rounds)

    flops = causal_flops(1, seq, h, d)

    def ratios(t):
        """Medians of per-round ratios: fraction of the matmul rate per impl, ringattention/ours."""
        rates = [matmul_flops / m for m in t["matmul"]]
        fraction = {name: statistics.median(flops / x / r for x, r in zip(t[name], rates))
                    for name in fns if name != "matmul"}
        speedup = (statistics.median(a / o for a, o in zip(t["ringattention"], t["ours"]))
                   if "ringattention" in t else None)
        return fraction, speedup

    fraction, speedup = ratios(times)
    cpu_fraction, cpu_speedup = ratios(cpu_times)
    pairs = ring_block_pairs(seq, sp, args.block)
    temp = {}
    for mseq in (int(s) for s in args.memory_seqs.split(",") if s):
        temp[mseq] = _temp_bytes(mesh, mseq, h, kv, d, args.block)
    return {
        "device": f"{sp} simulated CPU devices ({os.cpu_count()} cores)",
        "shape": {"batch": 1, "seq": seq, "heads": h, "kv_heads": kv, "head_dim": d, "dtype": "float32",
                  "block": ring_block(seq, sp, args.block), "sp": sp},
        "anchor_chunk": None if args.no_anchor else min(args.anchor_block, seq // sp),
        "rounds": args.rounds,
        "seconds_median": {name: statistics.median(t) for name, t in times.items()},
        "seconds": times,
        "causal_gflops_per_s_median": {name: flops / statistics.median(times[name]) / 1e9
                                       for name in fns if name != "matmul"},
        "matmul_gflops_per_s_median": matmul_flops / statistics.median(times["matmul"]) / 1e9,
        "fraction_of_matmul_rate_by_impl": fraction,
        "fraction_of_matmul_rate": fraction["ours"],
        "speedup_vs_ringattention": speedup,
        # The same ratios from process CPU time, which other processes' load disturbs far less.
        "cpu_time": {"seconds": cpu_times, "fraction_of_matmul_rate_by_impl": cpu_fraction,
                     "speedup_vs_ringattention": cpu_speedup},
        "compute_tile": compute_tile(ring_block(seq, sp, args.block)),
        "block_pairs_per_device": pairs.tolist(),
        "block_pairs_max_over_mean": float(pairs.max() / pairs.mean()),
        "block_pairs_total_over_causal_min": float(pairs.sum() / causal_min_block_pairs(seq, sp, args.block)),
        "temp_bytes_per_device": temp,
        "temp_growth_per_doubling": _growth(temp),
    }


def _temp_bytes(mesh, seq, heads, kv_heads, head_dim, block) -> int:
    """XLA's per-device temp bytes for our ring fwd + bwd at `seq` (compiled, not run)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lwm_jax.attention.ring import ring_attention

    sharding = NamedSharding(mesh, P(None, "sp", None, None))
    q = jax.ShapeDtypeStruct((1, seq, heads, head_dim), jnp.float32, sharding=sharding)
    kv = jax.ShapeDtypeStruct((1, seq, kv_heads, head_dim), jnp.float32, sharding=sharding)
    with jax.set_mesh(mesh):
        fn = _grad_fn(lambda q, k, v: ring_attention(q, k, v, block_size=block))
        compiled = fn.lower(q, kv, kv, q).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def _growth(temp: dict[int, int]) -> list[float]:
    seqs = sorted(temp)
    return [temp[b] / temp[a] for a, b in zip(seqs, seqs[1:])]


def bench_gpu(args) -> dict:
    """bf16, one device: our local kernels against `jax.nn.dot_product_attention(cudnn)`."""
    import jax
    import jax.numpy as jnp

    from lwm_jax.attention.blockwise import blockwise_attention
    from lwm_jax.attention.ring import ring_attention
    from lwm_jax.config import MeshConfig
    from lwm_jax.parallel.mesh import make_mesh

    seq, h, kv, d = args.gpu_seq, 32, 8, 128
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    shapes = [(1, seq, h, d), (1, seq, kv, d), (1, seq, kv, d), (1, seq, h, d)]
    inputs = [jax.random.normal(key, shape, jnp.bfloat16) for key, shape in zip(keys, shapes)]
    mesh = make_mesh(MeshConfig(sp=1), devices=jax.devices()[:1])
    fns = {
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
        # blockwise, kernel=auto: a no-merge call goes to cuDNN with cuDNN's own backward.
        "ours_blockwise_auto": lambda q, k, v: blockwise_attention(q, k, v, block_size=args.block),
        # What each ring step runs: cuDNN chunk forward, and cuDNN's backward fed the global
        # output and lse (pure-JAX backward where this JAX's cuDNN wrapper differs).
        "ours_ring_local_cudnn": lambda q, k, v: ring_attention(q, k, v, block_size=args.block, kernel="cudnn"),
        # The portable path, pure JAX.
        "ours_xla": lambda q, k, v: blockwise_attention(q, k, v, block_size=args.block, kernel="xla"),
    }
    timed = {}
    with jax.set_mesh(mesh):
        for name, attn in fns.items():
            fn = _grad_fn(attn)
            try:
                jax.block_until_ready(fn(*inputs))
            except Exception as err:  # report, keep the others
                timed[name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                continue
            timed[name] = fn
        runnable = {n: (f, inputs) for n, f in timed.items() if callable(f)}
        times, _ = _interleaved(runnable, args.rounds)
    flops = causal_flops(1, seq, h, d)
    from lwm_jax.attention.kernels import cudnn

    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "cudnn_fused_backward": cudnn._BWD_RULE is not None,
              "shape": {"batch": 1, "seq": seq, "heads": h, "kv_heads": kv, "head_dim": d, "dtype": "bfloat16"},
              "tflops_per_s_median": {n: flops / statistics.median(t) / 1e12 for n, t in times.items()},
              "failed": {n: v for n, v in timed.items() if not callable(v)}}
    if "cudnn" in times:
        result["ratio_vs_cudnn"] = {n: statistics.median(c / t for c, t in zip(times["cudnn"], times[n]))
                                    for n in times if n != "cudnn"}
    return result


def _print_cpu(r):
    print(f"causal attention fwd+bwd, {r['device']}, shape {r['shape']}, {r['rounds']} interleaved rounds")
    cpu = r["cpu_time"]
    print(f"{'impl':<16}{'median s':>10}{'GFLOP/s':>10}{'of matmul':>11}{'(CPU time)':>12}")
    for name, sec in r["seconds_median"].items():
        if name == "matmul":
            continue
        print(f"{name:<16}{sec:>10.2f}{r['causal_gflops_per_s_median'][name]:>10.1f}"
              f"{r['fraction_of_matmul_rate_by_impl'][name]:>10.0%}"
              f"{cpu['fraction_of_matmul_rate_by_impl'][name]:>12.0%}")
    print(f"{'matmul':<16}{r['seconds_median']['matmul']:>10.2f}{r['matmul_gflops_per_s_median']:>10.1f}")
    if r["speedup_vs_ringattention"] is not None:
        print(f"ringattention (chunks of {r['anchor_chunk']}) / ours (median of per-round ratios): "
              f"{r['speedup_vs_ringattention']:.2f}x (target >= {SPEEDUP_TARGET}x); "
              f"from CPU time {cpu['speedup_vs_ringattention']:.2f}x")
    print(f"ours at {r['fraction_of_matmul_rate']:.0%} of the matmul rate (target >= {MATMUL_FRACTION_TARGET:.0%}); "
          f"from CPU time {cpu['fraction_of_matmul_rate_by_impl']['ours']:.0%}")
    pairs = r["block_pairs_per_device"]
    print(f"block pairs per device (blocks of {r['shape']['block']}): max {max(pairs)}, "
          f"mean {sum(pairs) / len(pairs):.1f} (max/mean {r['block_pairs_max_over_mean']:.3f}); "
          f"total / causal minimum {r['block_pairs_total_over_causal_min']:.3f}")
    if r["compute_tile"] != r["shape"]["block"]:
        print(f"  (the CPU kernel computes each block as {r['compute_tile']}-position tiles and skips "
              "the masked tiles of diagonal blocks, so it does slightly less than this)")
    for seq, b in r["temp_bytes_per_device"].items():
        print(f"temp memory per device at seq {seq}: {b / 2**20:.1f} MiB")
    print("growth per doubling: " + ", ".join(f"{g:.2f}x" for g in r["temp_growth_per_doubling"]))


def _print_gpu(r):
    print(f"causal attention fwd+bwd on {r['device']} (jax {r['jax']}), shape {r['shape']}; "
          f"cuDNN backward with global statistics: {'yes' if r['cudnn_fused_backward'] else 'no'}")
    for name, tf in r["tflops_per_s_median"].items():
        ratio = r.get("ratio_vs_cudnn", {}).get(name)
        print(f"{name:<24}{tf:>8.1f} TFLOP/s" + (f"   {ratio:.2f}x cuDNN" if ratio else ""))
    for name, why in r["failed"].items():
        print(f"{name:<24}{why}")


def main(argv=None) -> int:
    args = _parse(argv)
    import jax

    gpu = args.gpu or jax.default_backend() == "gpu"
    result = bench_gpu(args) if gpu else bench_cpu(args)
    (_print_gpu if gpu else _print_cpu)(result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if "--gpu" not in sys.argv:  # simulated devices must be set before JAX starts
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={CPU_DEVICES}"])
    sys.exit(main())
