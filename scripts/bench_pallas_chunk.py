"""The Pallas chunk-pair kernel against the pure-JAX blocks (`xla`) on one ring chunk pair: the
diagonal pair (causal) and an off-diagonal pair (every key visible), forward and forward+backward.

On a GPU: a 65,536-token chunk pair in bfloat16 at Llama-3-8B heads (32 query heads on 8 KV heads
of 128), rounds interleaved in one process; it prints TFLOP/s (useful FLOPs: 4 * rows * keys *
head_dim forward, 14 * ... forward+backward with the backward's recomputed scores; half for the
diagonal pair), each kernel's ratio to the pure-JAX blocks (median of per-round ratios), and the
largest difference of the two kernels' results. On CPU the kernel runs interpreted, so it only
checks a small float32 pair against the pure-JAX blocks (exit 1 when it misses).

    python scripts/bench_pallas_chunk.py [--tokens 65536] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B
F32_ATOL = 1e-5  # the CPU check: float32, unit-scale inputs, only the order of float32 sums differs


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536, help="positions in the chunk pair (GPU)")
    p.add_argument("--block", type=int, default=512, help="the pure-JAX blocks' tile (Tiling.block)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


def _pair(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype, seed: int = 0):
    """A chunk pair in the rows layout (batch 1, natural positions, one document) and its cotangent."""
    import jax
    import jax.numpy as jnp

    from lwm_jax.attention import kernels as K

    group = heads // kv_heads
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    rows = (kv_heads, tokens * group, head_dim)
    q, dout = (jax.random.normal(key, rows, jnp.float32).astype(dtype) for key in keys[:2])
    k, v = (jax.random.normal(key, (kv_heads, tokens, head_dim), jnp.float32).astype(dtype) for key in keys[2:])
    pos = jnp.arange(tokens, dtype=jnp.int32)[None]
    meta = K.Meta(K.ids_to_rows(pos, kv_heads, group), None, K.ids_to_kv(pos, kv_heads), None)
    return q, k, v, dout, meta, group


def _programs(kernel, tiling, causal):
    """Jitted `forward` and `forward + backward` (fed the forward's own out and lse) of `kernel`."""
    import jax

    def fwd(q, k, v, meta):
        return kernel.forward(q, k, v, meta, tiling, causal=causal)

    def fwd_bwd(q, k, v, dout, meta):
        out, lse = kernel.forward(q, k, v, meta, tiling, causal=causal)
        return kernel.backward(q, k, v, out, dout, lse, meta, tiling, causal=causal)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def _max_diff(a, b) -> float:
    import jax.numpy as jnp

    return float(max(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))) for x, y in zip(a, b)))


def bench_gpu(args) -> dict:
    import jax
    import jax.numpy as jnp

    from lwm_jax.attention import kernels as K

    q, k, v, dout, meta, group = _pair(args.tokens, HEADS, KV_HEADS, HEAD_DIM, jnp.bfloat16)
    tiling = K.Tiling(group, args.block, 1.0 / np.sqrt(HEAD_DIM))
    kernels = {"pallas": K.get_kernel("pallas"), "xla": K.get_kernel("xla")}
    rows_keys_d = q.shape[0] * q.shape[1] * k.shape[1] * HEAD_DIM  # summed over the KV-head batch
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "shape": {"tokens": args.tokens, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                        "dtype": "bfloat16", "xla_block": args.block}, "pairs": {}}
    for pair, causal in (("diagonal", True), ("off_diagonal", False)):
        visible = 0.5 if causal else 1.0
        programs = {name: _programs(kern, tiling, causal) for name, kern in kernels.items()}
        calls = {}
        for name, (fwd, fwd_bwd) in programs.items():
            calls[f"{name}_fwd"] = (lambda f=fwd: f(q, k, v, meta), 4 * rows_keys_d * visible)
            calls[f"{name}_fwd_bwd"] = (lambda f=fwd_bwd: f(q, k, v, dout, meta), 14 * rows_keys_d * visible)
        outputs = {name: jax.block_until_ready(call()) for name, (call, _) in calls.items()}  # compile, warm up
        times = {name: [] for name in calls}
        for _ in range(args.rounds):  # interleaved: every program once per round
            for name, (call, _) in calls.items():
                start = time.perf_counter()
                jax.block_until_ready(call())
                times[name].append(time.perf_counter() - start)
        result["pairs"][pair] = {
            "tflops_per_s": {n: calls[n][1] / statistics.median(t) / 1e12 for n, t in times.items()},
            "pallas_speedup_vs_xla": {
                part: statistics.median(x / p for x, p in zip(times[f"xla_{part}"], times[f"pallas_{part}"]))
                for part in ("fwd", "fwd_bwd")},
            "max_abs_diff_vs_xla": {part: _max_diff(outputs[f"pallas_{part}"], outputs[f"xla_{part}"])
                                    for part in ("fwd", "fwd_bwd")}}
    return result


def check_cpu() -> dict:
    """A small float32 pair, interpreted, against the pure-JAX blocks (forward and backward)."""
    import jax.numpy as jnp

    from lwm_jax.attention import kernels as K

    q, k, v, dout, meta, group = _pair(64, 8, 2, 64, jnp.float32)
    tiling = K.Tiling(group, 16, 1.0 / np.sqrt(64))
    errors = {}
    for pair, causal in (("diagonal", True), ("off_diagonal", False)):
        got = [_programs(K.get_kernel(name), tiling, causal) for name in ("pallas", "xla")]
        errors[pair] = {"fwd": _max_diff(got[0][0](q, k, v, meta), got[1][0](q, k, v, meta)),
                        "fwd_bwd": _max_diff(got[0][1](q, k, v, dout, meta), got[1][1](q, k, v, dout, meta))}
    worst = max(e for pair in errors.values() for e in pair.values())
    return {"mode": "cpu check (interpreted, float32, 64 tokens, 8/2 heads of 64)", "max_abs_diff_vs_xla": errors,
            "bound": F32_ATOL, "ok": worst <= F32_ATOL}


def main(argv=None) -> int:
    args = _parse(argv)
    import jax

    if jax.devices()[0].platform == "gpu":
        result = bench_gpu(args)
        print(f"one chunk pair of {args.tokens:,} tokens on {result['device']} (jax {result['jax']}), "
              f"bf16, {HEADS}/{KV_HEADS} heads of {HEAD_DIM}, {args.rounds} interleaved rounds")
        print(f"{'pair':<14}{'program':<18}{'TFLOP/s':>9}{'pallas/xla':>12}{'max diff':>10}")
        for pair, r in result["pairs"].items():
            for name, tf in r["tflops_per_s"].items():
                part = name.split("_", 1)[1]
                extra = (f"{r['pallas_speedup_vs_xla'][part]:>11.2f}x{r['max_abs_diff_vs_xla'][part]:>10.2g}"
                         if name.startswith("pallas") else "")
                print(f"{pair:<14}{name:<18}{tf:>9.1f}{extra}")
        code = 0
    else:
        result = check_cpu()
        print(f"{result['mode']}: max abs difference against the pure-JAX blocks "
              f"{json.dumps(result['max_abs_diff_vs_xla'])} (bound {F32_ATOL}): {'ok' if result['ok'] else 'MISS'}")
        code = 0 if result["ok"] else 1
    if args.json:
        print(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
