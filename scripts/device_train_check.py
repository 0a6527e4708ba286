"""The training and generation parts of `scripts/device_check.sh`, and its report.

`train`: 3 train steps of a Llama-3.2-1B-shaped model (random weights, bf16 compute, full remat,
blockwise attention with kernel=auto) on one device at the longest power-of-two sequence the
planner says fits that device (capped where the planner's step time passes --step-budget-s, so
the whole check stays within 8 minutes): tokens/s, MFU, and the device's peak memory against the
plan and XLA's compiled figure. With `--offload`, the settings of the first stage of
configs/recipes/gradient_1048k_one_gpu.yaml instead: optimizer state in host memory (bf16
moments), layer inputs offloaded, the one-device ring over natural positions. `generate`: prefill
and decode tokens/s from a 131,072-token prompt on the same model shape. `report OUT`: the parts'
JSON files in OUT as one `device_check.json` and a markdown table (`device_check.md`) ready for the
README. `--tiny`: toy sizes, for CPU.

Usage: python scripts/device_train_check.py train|generate|report [--tiny] [--offload] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lwm_jax import generate as G  # noqa: E402
from lwm_jax.attention.layout import place  # noqa: E402
from lwm_jax.config import MeshConfig, ModelConfig, OptimizerConfig  # noqa: E402
from lwm_jax.hardware import HARDWARE, hardware_for_device  # noqa: E402
from lwm_jax.model.llama import Llama  # noqa: E402
from lwm_jax.parallel.mesh import make_mesh  # noqa: E402
from lwm_jax.planner import GIB, plan_stage  # noqa: E402
from lwm_jax.planner.analytic import whole_call  # noqa: E402
from lwm_jax.train.metrics import device_peak_flops, flops_per_token  # noqa: E402
from lwm_jax.train.optimizer import make_offload, make_optimizer  # noqa: E402
from lwm_jax.train.step import build_step, init_params  # noqa: E402

# meta-llama/Llama-3.2-1B's shapes (tied embeddings, 16 layers, GQA 32:8, head_dim 64).
LLAMA32_1B = ModelConfig(vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                         num_kv_heads=8, head_dim=64, tie_word_embeddings=True, dtype="bfloat16", remat="full",
                         attention="blockwise", attention_block_size=2048)
TINY = ModelConfig(vocab_size=4096, hidden_size=128, intermediate_size=448, num_layers=4, num_heads=8, num_kv_heads=2,
                   head_dim=16, bos_token_id=1, eos_token_id=(2,), dtype="float32", remat="full",
                   attention="blockwise", attention_block_size=128)
STEPS = 3
FULL = {"model": LLAMA32_1B, "loss_chunk": 4096, "min_seq": 8192, "max_seq": 1 << 21, "prompt": 131_072,
        "new_tokens": 64}
TOY = {"model": TINY, "loss_chunk": 256, "min_seq": 256, "max_seq": 512, "prompt": 512, "new_tokens": 8}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("train", "generate", "report"))
    p.add_argument("--tiny", action="store_true", help="toy sizes (CPU)")
    p.add_argument("--offload", action="store_true",
                   help="train with the one-GPU recipe's settings: optimizer.offload, remat offload, the ring")
    p.add_argument("--out", default="device_check_out", help="folder of the parts' JSON files (default %(default)s)")
    p.add_argument("--memory-gib", type=float, help="device memory to plan against (default: what the device "
                   "reports; --tiny: 0.0625)")
    p.add_argument("--step-budget-s", type=float, default=30.0,
                   help="longest planned step time to run (default %(default)s s; 0: no cap)")
    return p.parse_args(argv)


def _batch(seq: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(1, 1, seq + 1)).astype(np.int32)
    positions = np.arange(seq, dtype=np.int32)[None, None]
    return {"inputs": tokens[..., :-1], "positions": positions, "segment_ids": np.ones_like(positions),
            "targets": tokens[..., 1:], "loss_weights": np.ones((1, 1, seq), np.float32)}


def _longest(config: ModelConfig, hw, sizes: dict, budget_s: float, optimizer: OptimizerConfig
             ) -> tuple[int, int, dict]:
    """(the planner's longest fitting power-of-two sequence, the one to run, its plan)."""
    fitting = {}
    seq = sizes["min_seq"]
    moment_bytes = np.dtype(optimizer.moment_dtype).itemsize
    whole = whole_call(config, MeshConfig(), "continuous", hw.platform)
    while seq <= sizes["max_seq"]:
        plan = plan_stage(config, MeshConfig(), seq, 1, 1, STEPS, sizes["loss_chunk"], hw, moment_bytes,
                          optimizer.offload, whole)
        if not plan["fits"]:
            break
        fitting[seq] = plan
        seq *= 2
    if not fitting:
        raise SystemExit(f"the planner says not even {sizes['min_seq']:,} tokens fit {hw.memory_gib:.2f} GiB")
    longest = max(fitting)
    within = [s for s, p in fitting.items() if not budget_s or p["step_s"] <= budget_s]
    run = max(within) if within else min(fitting)
    return longest, run, fitting[run]


def train_check(args, sizes: dict) -> dict:
    device = jax.local_devices()[0]
    mesh = make_mesh(MeshConfig(), devices=[device])
    reported = G.device_memory_bytes(mesh)
    memory = int(args.memory_gib * GIB) if args.memory_gib else reported or (int(GIB / 16) if args.tiny else None)
    if memory is None:
        raise SystemExit(f"{device.device_kind} reports no memory; pass --memory-gib")
    peak, peak_source = device_peak_flops(device)
    entry = hardware_for_device(device.device_kind)
    base = entry or HARDWARE["H100"]  # links and efficiency of a known GPU for a device the table lacks
    hw = dataclasses.replace(base, name=device.device_kind, memory_gib=memory / GIB,
                             peak_tflops=peak / 1e12 if peak else base.peak_tflops)
    config, optimizer = sizes["model"], OptimizerConfig()
    if args.offload:  # the one-GPU recipe's settings
        config = config.replace(remat="offload", attention="ring")
        optimizer = OptimizerConfig(moment_dtype="bfloat16", offload=True)
    longest, seq, plan = _longest(config, hw, sizes, args.step_budget_s, optimizer)
    config = config.replace(max_position_embeddings=seq)
    tx = make_optimizer(optimizer, STEPS)
    with jax.set_mesh(mesh):
        fns = build_step(config, tx, mesh, loss_chunk=sizes["loss_chunk"], offload=make_offload(optimizer, STEPS),
                         natural_positions=True)
        params = jax.device_put(init_params(config, 0, mesh), fns.params_shardings)
        opt_state = fns.init_opt_state(params)
        batch = place(_batch(seq, config.vocab_size), config.attention, mesh, axis=2)
        start = time.perf_counter()
        step = fns.train_step.lower(params, opt_state, batch).compile()
        compile_s = time.perf_counter() - start
        analysis = step.memory_analysis()
        times, losses = [], []
        for _ in range(STEPS):
            start = time.perf_counter()
            params, opt_state, metrics = step(params, opt_state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
            losses.append(float(metrics["loss"]))
    stats = device.memory_stats() or {}
    measured = stats.get("peak_bytes_in_use")
    compiled = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes \
        - analysis.alias_size_in_bytes
    tokens_per_s = seq / statistics.median(times)
    planned = plan["memory_bytes_per_device"]
    return {
        "device": device.device_kind, "jax": jax.__version__, "params": config.num_params,
        "model": "Llama-3.2-1B shapes" if not args.tiny else "tiny", "dtype": config.dtype,
        "optimizer_offload": optimizer.offload, "remat": config.remat, "attention": config.attention,
        "planned_host_bytes": plan["host_bytes_per_device"],
        "device_memory_bytes": memory, "device_memory_source": "reported" if memory == reported else "given",
        "planner_longest_seq": longest, "seq_len": seq, "step_budget_s": args.step_budget_s,
        "planned_step_s": plan["step_s"], "planned_bytes": planned, "compiled_bytes": int(compiled),
        "measured_peak_bytes": measured,
        "measured_over_planned": measured / planned if measured else None,
        "measured_peak_reason": None if measured else f"{device.platform} reports no peak_bytes_in_use",
        "compile_s": compile_s, "step_s": times, "losses": losses, "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token(config, seq) / peak if peak else None, "peak_flops_source": peak_source,
    }


def generate_check(args, sizes: dict) -> dict:
    n, new = sizes["prompt"], sizes["new_tokens"]
    config = sizes["model"].replace(max_position_embeddings=n + new)
    model = Llama(config, nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, n).astype(np.int32)
    plan = G.cache_spec(config, n, new, None)
    timings = {}
    for label in ("first", "timed"):  # the first call of each compiles
        start = time.perf_counter()
        logits, cache = jax.block_until_ready(G.prefill(model, prompt, plan))
        timings[f"prefill_{label}_s"] = time.perf_counter() - start
        start = time.perf_counter()
        out, count = G.decode(model, cache, logits, plan)
        jax.block_until_ready(out)
        timings[f"decode_{label}_s"] = time.perf_counter() - start
        del cache
    assert int(count) == new, (int(count), new)
    device = jax.local_devices()[0]
    return {"device": device.device_kind, "jax": jax.__version__, "params": config.num_params,
            "prompt_tokens": n, "new_tokens": new, "kernel": config.attention_kernel, **timings,
            "prefill_tokens_per_s": n / timings["prefill_timed_s"],
            "decode_tokens_per_s": new / timings["decode_timed_s"]}


def _load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _rows(d: dict, a: dict, t: dict, g: dict) -> list[tuple[str, str]]:
    """(measure, value) rows of the README's table from the parts' results (empty dicts: not run)."""
    missing = "failed or not run (see its log)"
    rows = []
    if d:
        plugins = ", ".join(f"{k} {v}" for k, v in d["versions"].items() if k.startswith(("jax-cuda", "libtpu")))
        rows.append(("device, JAX", f"{d['devices']['count']} x {d['devices']['kind']}, jax {d['versions']['jax']}"
                     + (f" ({plugins})" if plugins else "")))
        mm = d["matmul_tflops"]
        rows.append((f"dense matmul, {mm['dtype']}, one device", f"{mm['measured']:.3g} TFLOP/s"
                     + (f" ({mm['fraction']:.0%} of the table's {mm['peak']:g})" if mm["peak"] else "")))
    else:
        rows += [("device, JAX", missing), ("dense matmul, one device", missing)]
    rows += _attention_rows(a, missing)
    if t:
        model = f"train, {t['model']} ({t['params'] / 1e6:,.0f}M params)"
        measured = (f"{t['measured_peak_bytes'] / GIB:.2f} GiB ({t['measured_over_planned'] - 1:+.0%})"
                    if t["measured_peak_bytes"] else t["measured_peak_reason"])
        rows += [(f"{model}: planner's longest sequence / run", f"{t['planner_longest_seq']:,} / {t['seq_len']:,}"),
                 ("train: memory per device, planned / XLA compiled / measured peak",
                  f"{t['planned_bytes'] / GIB:.2f} / {t['compiled_bytes'] / GIB:.2f} GiB / {measured}"),
                 ("train: tokens/s, MFU", f"{t['tokens_per_s']:,.0f}, " + (f"{t['mfu']:.1%}" if t["mfu"] else "n/a"))]
    else:
        rows += [("train: sequence", missing), ("train: peak memory", missing), ("train: tokens/s, MFU", missing)]
    if g:
        rows += [(f"generate, {g['prompt_tokens']:,}-token prompt: prefill tokens/s",
                  f"{g['prefill_tokens_per_s']:,.0f}"),
                 (f"generate: decode tokens/s ({g['new_tokens']} new)", f"{g['decode_tokens_per_s']:,.1f}")]
    else:
        rows += [("generate: prefill tokens/s", missing), ("generate: decode tokens/s", missing)]
    return rows


def _attention_rows(a: dict, missing: str) -> list[tuple[str, str]]:
    """The attention rows: per length, the Pallas kernel's fwd+bwd TFLOP/s on a ring chunk pair
    against the pure-JAX blocks and a whole cuDNN call, and on a whole call against cuDNN; on CPU the
    interpreted kernel's check."""
    if not a:
        return [("attention fwd+bwd, bf16, 32/8 heads x 128", missing)]
    if "pallas_check" in a:  # CPU: correctness only
        check = a["pallas_check"]
        return [("attention: Pallas kernel interpreted vs pure-JAX blocks", f"{'ok' if check['ok'] else 'MISS'} "
                 f"(bound {check['bound']:g})")]
    rows = []
    for seq, e in a["seqs"].items():
        tf = e["tflops_per_s"]
        pair = tf.get("pair_diagonal/pallas/fwd_bwd")
        x = lambda v: f"{v:.2f}x" if v is not None else "n/a"
        rows.append((f"attention fwd+bwd, {int(seq):,}-token ring chunk pair (diagonal), bf16, 32/8 heads x 128: "
                     "Pallas TFLOP/s, vs pure-JAX blocks, vs a whole cuDNN call",
                     (f"{pair:.0f}" if pair else "failed") + f", {x(e['pallas_over_xla'].get('pair_diagonal/fwd_bwd'))}"
                     f", {x(e.get('pallas_pair_over_cudnn_whole'))}"))
        rows.append((f"attention fwd+bwd, {int(seq):,}-token whole causal call: Pallas / cuDNN / pure-JAX TFLOP/s",
                     " / ".join(f"{tf[k]:.0f}" if k in tf else "failed"
                                for k in ("whole/pallas/fwd_bwd", "whole/cudnn/fwd_bwd", "whole/xla/fwd_bwd"))))
    return rows


def report(out: Path) -> dict:
    """`device_check.json` (every part) and `device_check.md` (the README's table) in `out`."""
    parts = {name: _load(out, name) for name in ("doctor", "attention", "train", "generate")}
    rows = _rows(*(parts[k] or {} for k in ("doctor", "attention", "train", "generate")))
    table = "| measure | value |\n|---|---|\n" + "".join(f"| {r} | {c} |\n" for r, c in rows)
    result = {**parts, "complete": all(parts.values())}
    (out / "device_check.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "device_check.md").write_text(table)
    print(table, end="")
    return result


def main(argv=None) -> int:
    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "report":
        return 0 if report(out)["complete"] else 1
    sizes = TOY if args.tiny else FULL
    result = (train_check if args.part == "train" else generate_check)(args, sizes)
    name = "train_offload" if args.part == "train" and args.offload else args.part
    (out / f"{name}.json").write_text(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
