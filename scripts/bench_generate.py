"""Generation benchmark: ring prefill seconds and decode tokens/s at 4K and 16K context on 8
simulated CPU devices (sp=8), decoding over the sequence-sharded KV cache against the same cache
on one device.

A tiny random model (the cost is the attention over the context, not the weights). Decode runs
are interleaved (sharded, single, then again) because this machine's load varies; the ratio is
per round, reported as the median. It also counts the collectives in the compiled sharded decode
step: flash-decoding only all-reduces small partials, so it must hold no all-gather and no
collective-permute (the cache never moves). Human table first; with `--json` the last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CPU_DEVICES = 8
os.environ["XLA_FLAGS"] = " ".join([f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
                                   + [f"--xla_force_host_platform_device_count={CPU_DEVICES}"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="4096,16384", help="prompt lengths (default 4096,16384)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per run (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved decode rounds (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


def _collectives(hlo: str) -> dict[str, int]:
    ops = ("all-gather", "collective-permute", "all-to-all", "all-reduce")
    return {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in ops}


def _measure_context(args, context, config, model, single_model, mesh, rng):
    """(context, prefill s, sharded and single-device decode tokens/s, their median ratio, the
    sharded decode's collectives) for one prompt length."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lwm_jax import generate as G

    one_device = jax.devices()[0]
    prompt = rng.integers(2, config.vocab_size, context).astype(np.int32)
    plan = G.cache_spec(config, context, args.new_tokens, mesh)
    single_plan = G.cache_spec(config.replace(attention="blockwise"), context, args.new_tokens, None)
    jax.block_until_ready(G.prefill(model, prompt, plan, mesh))  # compile
    start = time.perf_counter()
    logits, cache = jax.block_until_ready(G.prefill(model, prompt, plan, mesh))
    prefill_s = time.perf_counter() - start
    # The same cache on one device (padded to the single-device plan's length).
    pad = single_plan.cache_len - plan.cache_len
    host = [np.pad(np.asarray(c), ((0, 0), (0, 0), (0, max(pad, 0)), (0, 0), (0, 0)))[:, :, :single_plan.cache_len]
            for c in cache]
    single_cache = tuple(jax.device_put(c, one_device) for c in host)
    single_logits = jax.device_put(np.asarray(logits), one_device)
    sharded_hlo = G.loop._decode.lower(model, cache, logits, jnp.int32(context), jax.random.key(0),
                                       jnp.asarray([-1], jnp.int32), jnp.float32(1), jnp.float32(1),
                                       max_new_tokens=args.new_tokens, greedy=True, mesh=mesh).compile().as_text()

    def run(m, c, lg, p, msh):
        t0 = time.perf_counter()
        out, count = G.decode(m, c, lg, p, mesh=msh)
        jax.block_until_ready(out)
        assert int(count) == args.new_tokens
        return args.new_tokens / (time.perf_counter() - t0), np.asarray(out)

    _, ref = run(single_model, single_cache, single_logits, single_plan, None)  # compile both
    _, got = run(model, cache, logits, plan, mesh)
    assert (ref == got).all(), "sharded and single-device decode disagree"
    sharded, single, ratios = [], [], []
    for _ in range(args.rounds):
        s = run(model, cache, logits, plan, mesh)[0]
        o = run(single_model, single_cache, single_logits, single_plan, None)[0]
        sharded.append(s)
        single.append(o)
        ratios.append(s / o)
    return (context, prefill_s, statistics.median(sharded), statistics.median(single), statistics.median(ratios),
            _collectives(sharded_hlo))


def main(argv=None) -> int:
    args = _parse(argv)
    import numpy as np
    from flax import nnx

    from lwm_jax import generate as G
    from lwm_jax.config import MeshConfig, ModelConfig
    from lwm_jax.model.llama import Llama
    from lwm_jax.parallel.mesh import make_mesh

    config = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=64, bos_token_id=0, eos_token_id=(1,), remat="none",
                         attention="ring", attention_block_size=512)
    mesh = make_mesh(MeshConfig(sp=CPU_DEVICES))
    model = G.place_model(Llama(config, nnx.Rngs(0)), mesh)
    single_model = Llama(config, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    results: dict[str, dict] = {"prefill_s": {}, "decode_tokens_per_s": {}, "decode_tokens_per_s_single": {},
                                "decode_sharded_over_single": {}, "decode_collectives": {}}
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        row = _measure_context(args, context, config, model, single_model, mesh, rng)
        key = str(context)
        results["prefill_s"][key] = row[1]
        results["decode_tokens_per_s"][key] = row[2]
        results["decode_tokens_per_s_single"][key] = row[3]
        results["decode_sharded_over_single"][key] = row[4]
        results["decode_collectives"][key] = row[5]
        rows.append(row)
    print(f"model: {config.num_params:,} params, {config.num_layers} layers, kv_heads {config.num_kv_heads}, "
          f"head_dim {config.head_dim}; mesh sp={CPU_DEVICES} on {CPU_DEVICES} simulated CPU devices "
          f"({os.cpu_count()} host cores); {args.new_tokens} new tokens, {args.rounds} interleaved rounds")
    print(f"{'context':>8} {'prefill s':>10} {'decode tok/s sp=8':>18} {'decode tok/s 1 dev':>19} "
          f"{'sharded/single':>15} {'all-gather':>11} {'coll-permute':>13}")
    for context, p, s, o, r, c in rows:
        print(f"{context:>8,} {p:>10.2f} {s:>18.1f} {o:>19.1f} {r:>15.2f} {c['all-gather']:>11} "
              f"{c['collective-permute']:>13}")
    results.update(devices=CPU_DEVICES, new_tokens=args.new_tokens, params=config.num_params)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
