"""Train-step benchmark: tokens/s and MFU of the tiny config on this machine (8 simulated CPU
devices, mesh dp=2,sp=4, ring attention), and XLA's compiled per-device memory of one train step of
the real Llama-3-8B at 65,536 tokens on an 8-device mesh (compiled, never run).

Usage: python scripts/bench_train.py [--json] [--steps N] [--skip-8b]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = " ".join([f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
                                   + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lwm_jax.attention.layout import place  # noqa: E402
from lwm_jax.config import MeshConfig, OptimizerConfig, load_model_config  # noqa: E402
from lwm_jax.model.store import params_target  # noqa: E402
from lwm_jax.parallel.mesh import make_mesh  # noqa: E402
from lwm_jax.train.metrics import flops_per_token, measured_matmul_flops  # noqa: E402
from lwm_jax.train.optimizer import make_optimizer  # noqa: E402
from lwm_jax.train.step import BATCH_KEYS, build_step, init_params  # noqa: E402


def _batch(accum, batch, seq, vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(accum, batch, seq + 1)).astype(np.int32)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int32), (accum, batch, seq)).copy()
    return {"inputs": tokens[..., :-1], "positions": pos, "segment_ids": np.ones_like(pos),
            "targets": tokens[..., 1:], "loss_weights": np.ones((accum, batch, seq), np.float32)}


def tiny_throughput(steps: int, seq: int = 1024, batch: int = 4) -> dict:
    """Tokens/s and MFU of the demo's tiny model (ring attention, zigzag) on dp=2,sp=4."""
    config = load_model_config(ROOT / "configs/models/tiny.yaml", ["attention=ring", "attention_block_size=128"])
    mesh = make_mesh(MeshConfig(dp=2, sp=4))
    tx = make_optimizer(OptimizerConfig(lr=1e-3), steps)
    with jax.set_mesh(mesh):
        fns = build_step(config, tx, mesh, loss_chunk=1024)
        params = init_params(config, 0, mesh)
        opt_state = fns.init_opt_state(params)
        arrays = place(_batch(1, batch, seq, config.vocab_size), config.attention, mesh, axis=2)
        params, opt_state, m = fns.train_step(params, opt_state, arrays)  # compile
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            params, opt_state, m = fns.train_step(params, opt_state, arrays)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - start)
    rate = measured_matmul_flops()
    tokens_per_s = batch * seq / statistics.median(times)
    return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token(config, seq) / rate,
            "matmul_flops": rate, "step_s": statistics.median(times), "seq_len": seq, "batch": batch,
            "params": config.num_params}


def llama3_8b_memory(seq: int = 65_536) -> dict:
    """XLA's per-device memory for one Llama-3-8B train step at `seq` tokens on sp=8 (not run)."""
    config = load_model_config(ROOT / "configs/models/llama3_8b.yaml")
    mesh = make_mesh(MeshConfig(sp=8))
    tx = make_optimizer(OptimizerConfig(), 30)
    with jax.set_mesh(mesh):
        fns = build_step(config, tx, mesh, loss_chunk=4096)
        p_abs = params_target(config, mesh)
        o_abs = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             jax.eval_shape(tx.init, p_abs), fns.opt_shardings)
        b_abs = {k: jax.ShapeDtypeStruct((1, 1, seq), np.float32 if k == "loss_weights" else np.int32,
                                         sharding=fns.batch_sharding) for k in BATCH_KEYS}
        start = time.perf_counter()
        compiled = fns.train_step.lower(p_abs, o_abs, b_abs).compile()
        compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    return {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes), "compile_s": compile_s, "seq_len": seq}


def _learnable_batch(batch, seq, vocab, seed):
    """One micro-batch of a 16-token random run (from 64 of the ids) repeated: the ids' frequencies
    are learned within a few steps, the copying more slowly, so the loss moves over 30 steps."""
    rng = np.random.default_rng(seed)
    run = rng.integers(0, min(vocab, 64), size=(batch, 16))
    tokens = np.tile(run, (1, (seq + 1) // 16 + 1))[:, : seq + 1].astype(np.int32)[None]
    pos = np.broadcast_to(np.arange(seq, dtype=np.int32), (1, batch, seq)).copy()
    return {"inputs": tokens[..., :-1], "positions": pos, "segment_ids": np.ones_like(pos),
            "targets": tokens[..., 1:], "loss_weights": np.ones((1, batch, seq), np.float32)}


def moment_dtype_effect(steps: int) -> dict:
    """Final loss of the tiny model after `steps` steps with float32 and with bfloat16 AdamW moments
    (same data, same init): what storing the moments in bf16 costs at small scale."""
    config = load_model_config(ROOT / "configs/models/tiny.yaml", ["attention=ring", "attention_block_size=64"])
    mesh = make_mesh(MeshConfig(dp=2, sp=4))
    out = {}
    for dtype in ("float32", "bfloat16"):
        tx = make_optimizer(OptimizerConfig(lr=3e-3, moment_dtype=dtype), steps)
        with jax.set_mesh(mesh):
            fns = build_step(config, tx, mesh, loss_chunk=512)
            params = init_params(config, 0, mesh)
            opt_state = fns.init_opt_state(params)
            losses = []
            for step in range(steps):
                batch = place(_learnable_batch(4, 512, config.vocab_size, seed=step), config.attention, mesh, axis=2)
                params, opt_state, m = fns.train_step(params, opt_state, batch)
                losses.append(float(m["loss"]))
        out[dtype] = losses
    return {"steps": steps, "final_loss_float32": out["float32"][-1], "final_loss_bfloat16": out["bfloat16"][-1],
            "max_abs_loss_difference": max(abs(a - b) for a, b in zip(out["float32"], out["bfloat16"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of the tiny model")
    parser.add_argument("--skip-8b", action="store_true", help="skip the Llama-3-8B compiles")
    parser.add_argument("--moment-steps", type=int, default=30, help="steps of the moment-dtype comparison")
    args = parser.parse_args()

    tiny = tiny_throughput(args.steps)
    print(f"tiny model ({tiny['params']:,} params), seq {tiny['seq_len']}, batch {tiny['batch']}, 8 CPU devices "
          f"(dp=2, sp=4, ring):")
    print(f"  {tiny['tokens_per_s']:,.0f} tokens/s, step {tiny['step_s']:.3f} s, MFU {tiny['mfu']:.1%} of the "
          f"measured float32 matmul rate ({tiny['matmul_flops'] / 1e9:.1f} GFLOP/s)")
    result = {"tokens_per_s": tiny["tokens_per_s"], "mfu": tiny["mfu"], "tiny": tiny}
    moments = moment_dtype_effect(args.moment_steps)
    print(f"AdamW moments in bfloat16 vs float32, tiny model, {moments['steps']} steps: final loss "
          f"{moments['final_loss_bfloat16']:.4f} vs {moments['final_loss_float32']:.4f} "
          f"(largest per-step difference {moments['max_abs_loss_difference']:.4f})")
    result["moment_dtype"] = moments
    if not args.skip_8b:
        gib = 2**30
        for key, seq in (("65k", 65_536), ("1m", 1_048_576)):
            big = llama3_8b_memory(seq)
            print(f"Llama-3-8B train step at {big['seq_len']:,} tokens on 8 devices (sp=8), compiled in "
                  f"{big['compile_s']:.0f} s: per device temp {big['temp_bytes'] / gib:.2f} GiB, arguments "
                  f"{big['argument_bytes'] / gib:.2f} GiB, outputs {big['output_bytes'] / gib:.2f} GiB")
            result[f"llama3_8b_{key}_temp_bytes_per_device"] = big["temp_bytes"]
            result[f"llama3_8b_{key}"] = big
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
