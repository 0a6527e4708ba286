"""The `lwm-jax` command: one sub-command per job, each a thin layer over the library.

JAX is imported only inside command handlers, after `--cpu-devices` has set `XLA_FLAGS`, because
the number of simulated CPU devices is fixed when JAX initialises.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lwm_jax.errors import UserError


def _print_result(args, result: dict, lines: list[str]) -> None:
    """Prints human-readable lines, or with `--json` one JSON object as the last line (process 0 only)."""
    if "jax" in sys.modules and sys.modules["jax"].process_index() != 0:
        return
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        print("\n".join(lines))


def _mesh(args):
    """The mesh named by `--mesh` (None when absent)."""
    if not getattr(args, "mesh", None):
        return None
    from lwm_jax.config import MeshConfig
    from lwm_jax.parallel.mesh import make_mesh

    return make_mesh(MeshConfig.parse(args.mesh))


def _runtime(args) -> dict:
    runtime = {}
    if getattr(args, "attention", None):
        runtime["attention"] = args.attention
    if getattr(args, "dtype", None):
        runtime["dtype"] = args.dtype
    return runtime


# Handlers ---------------------------------------------------------------------------------------


def cmd_theta(args) -> int:
    from lwm_jax.model.rope import theta_for

    if args.context <= 0 or args.orig_context <= 0 or args.base <= 0 or args.head_dim <= 2:
        raise UserError("--context, --orig-context and --base must be positive and --head-dim > 2")
    theta = theta_for(args.method, args.context, args.base, args.head_dim, args.orig_context)
    _print_result(args, {"theta": theta, "method": args.method, "context": args.context},
                  [f"{args.method} theta for context {args.context:,}: {theta:,.0f}"])
    return 0


def cmd_import_hf(args) -> int:
    from lwm_jax.convert.hf import import_hf
    from lwm_jax.train.checkpoint import model_metadata, save_model

    model = import_hf(args.hf_dir, mesh=_mesh(args))
    path = save_model(args.ckpt, model, model_metadata(model.config, source=os.path.abspath(args.hf_dir)),
                      overwrite=args.force)
    cfg = model.config
    _print_result(args, {"checkpoint": str(path), "params": cfg.num_params, "rope_theta": cfg.rope_theta},
                  [f"imported {cfg.num_params:,} params (theta {cfg.rope_theta:,.0f}) into {path}"])
    return 0


def cmd_export_hf(args) -> int:
    from lwm_jax.convert.hf import export_hf, parse_size, stage_checkpoint, write_model_card
    from lwm_jax.train.checkpoint import load_model

    max_shard = parse_size(args.max_shard_size)
    ckpt, card = (stage_checkpoint(args.ckpt, args.stage) if args.stage else (args.ckpt, None))
    model, meta = load_model(ckpt)
    out = export_hf(model, args.out_dir, dtype=args.dtype, tokenizer_dir=args.tokenizer,
                    max_position_embeddings=meta.get("max_position_embeddings"),
                    max_shard_bytes=max_shard, force=args.force)
    if card is not None:
        write_model_card(out, card, meta)
    _print_result(args, {"out_dir": str(out), "dtype": args.dtype},
                  [f"wrote Hugging Face model ({args.dtype}) to {out}"])
    return 0


def cmd_eval_ppl(args) -> int:
    from lwm_jax.eval.perplexity import load_tokens, mean_nll
    from lwm_jax.train.checkpoint import load_model, read_metadata

    vocab = read_metadata(args.ckpt)["model"]["vocab_size"]
    tokens = load_tokens(args.tokens, vocab)
    mesh = _mesh(args)
    if args.attention == "ring" and mesh is None:
        raise UserError("--attention ring needs a mesh with an sp axis, e.g. --mesh dp=2,sp=4")
    import jax

    with jax.set_mesh(mesh) if mesh is not None else _nullcontext():
        model, _ = load_model(args.ckpt, mesh=mesh, **_runtime(args))
        nll, count = mean_nll(model, tokens, mesh=mesh)
    _print_result(args, {"mean_nll": nll, "tokens": count},
                  [f"mean NLL {nll:.6f} over {count:,} predicted tokens (perplexity {_exp(nll):.3f})"])
    return 0


def cmd_train(args) -> int:
    from lwm_jax.config import load_recipe
    from lwm_jax.train.runner import train

    recipe = load_recipe(args.recipe, args.set or [])
    profile = None
    if args.profile:
        start, sep, end = args.profile.partition(":")
        if not (sep and start.isdigit() and end.isdigit() and int(start) < int(end)):
            raise UserError(f"--profile {args.profile!r} must be START:END step numbers with START < END")
        profile = (int(start), int(end))
    workdir = args.workdir or f"runs/{recipe.name}"
    summaries = train(recipe, workdir, only_stage=args.stage, profile=profile)
    lines = [f"{'stage':>8} {'seq_len':>9} {'theta':>15} {'steps':>6} {'final loss':>11} {'tokens/s':>10}"]
    for s in summaries:
        loss = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "-"
        tps = f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "-"
        lines.append(f"{s['stage']:>8} {s['seq_len']:>9,} {s['rope_theta']:>15,.0f} {s['steps']:>6} {loss:>11} {tps:>10}")
    lines.append(f"workdir: {workdir}")
    _print_result(args, {"workdir": str(workdir), "stages": summaries}, lines)
    return 0


def cmd_export_gguf(args) -> int:
    from lwm_jax.convert.gguf import export_checkpoint

    r = export_checkpoint(args.ckpt, args.out, args.tokenizer, type=args.type, force=args.force)
    size = r["file_bytes"] / 2**20
    _print_result(args, r, [f"wrote {r['type']} GGUF ({r['tensors']} tensors, {size:,.1f} MiB) to {r['path']}: "
                            f"context {r['context_length']:,}, rope base {r['rope_theta']:,.0f}"])
    return 0


def cmd_plan(args) -> int:
    import dataclasses
    import subprocess

    from lwm_jax.config import load_recipe
    from lwm_jax.plan import HARDWARE, aot_memory, plan_recipe_stages

    recipe = load_recipe(args.recipe, args.set or [])
    if args.aot_worker:  # one stage, in a process started with --cpu-devices = its device count
        print(json.dumps(aot_memory(recipe, args.stage, args.devices)))
        return 0
    if args.hardware not in HARDWARE:
        raise UserError(f"--hardware {args.hardware!r} is not one of {sorted(HARDWARE)}")
    hw = HARDWARE[args.hardware]
    changes = {k: v for k, v in (("memory_gib", args.device_memory), ("peak_tflops", args.peak_tflops),
                                  ("efficiency", args.efficiency)) if v is not None}
    hw = dataclasses.replace(hw, **changes)
    stages = plan_recipe_stages(recipe, hw, args.devices, args.stage)
    if args.aot:
        for stage in stages:
            cmd = [sys.executable, "-m", "lwm_jax.cli", "--cpu-devices", str(stage["devices"]), "plan", args.recipe,
                   "--stage", stage["name"], "--aot-worker"] + [a for kv in (args.set or []) for a in ("--set", kv)]
            if args.devices:
                cmd += ["--devices", str(args.devices)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise UserError(f"AOT compile of stage {stage['name']} failed: {proc.stderr.strip().splitlines()[-1]}")
            aot = json.loads(proc.stdout.strip().splitlines()[-1])
            stage["aot_memory_bytes_per_device"] = aot["total"]
            stage["aot_memory"] = aot
    gib = 2**30
    lines = [f"{hw.name}: {hw.memory_gib:g} GiB, {hw.peak_tflops:g} TFLOP/s at {hw.efficiency:.0%} efficiency",
             f"{'stage':>7} {'seq_len':>10} {'devices':>7} {'GiB/device':>10} {'aot GiB':>8} {'fits':>5} "
             f"{'step s':>8} {'minutes':>8}"]
    for s in stages:
        aot = f"{s['aot_memory_bytes_per_device'] / gib:.2f}" if "aot_memory_bytes_per_device" in s else "-"
        lines.append(f"{s['name']:>7} {s['seq_len']:>10,} {s['devices']:>7} {s['memory_bytes_per_device'] / gib:>10.2f} "
                     f"{aot:>8} {'yes' if s['fits'] else 'NO':>5} {s['step_s']:>8.1f} {s['estimated_minutes']:>8.1f}")
    _print_result(args, {"hardware": dataclasses.asdict(hw), "stages": stages}, lines)
    return 0


def _exp(x: float) -> float:
    import math

    return math.exp(min(x, 700.0))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# Parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lwm-jax",
        description="Extend Llama-3 context to a million tokens: progressive RoPE-theta training "
                    "with ring attention on JAX.")
    parser.add_argument("--cpu-devices", type=int, metavar="N",
                        help="simulate N CPU devices (for meshes on a laptop); set before JAX starts")
    group = parser.add_argument_group("multi-host (one process per host; TPU VMs and SLURM are detected)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
    group.add_argument("--num-processes", type=int, metavar="N", help="number of processes in the run")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    group.add_argument("--heartbeat-timeout", type=int, default=60, metavar="S",
                       help="exit with an error when another process is silent this long (default 60)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("theta", help="RoPE theta for a target context length",
                       description="Computes the RoPE base (theta) for a target context from the "
                                   "scaling-law rule b**(ln(L/2pi)/ln(L0/2pi)) (what Gradient used) "
                                   "or the NTK-aware rule b*(L/L0)**(d/(d-2)).")
    p.add_argument("--context", type=int, required=True, help="target context length L in tokens")
    p.add_argument("--base", type=float, default=500_000.0, help="original theta b (default 500000)")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dim d (default 128)")
    p.add_argument("--orig-context", type=int, default=8192, help="original context L0 (default 8192)")
    p.add_argument("--method", choices=("scaling-law", "ntk"), default="scaling-law",
                   help="formula (default scaling-law)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_theta)

    p = sub.add_parser("import-hf", help="Hugging Face Llama folder -> lwm-jax orbax checkpoint",
                       description="Reads config.json and safetensors weights (single or sharded "
                                   "with model.safetensors.index.json) and writes an orbax checkpoint "
                                   "with metadata. Pickle (.bin) weights are refused.")
    p.add_argument("hf_dir", help="Hugging Face model folder")
    p.add_argument("ckpt", help="output checkpoint folder (must not exist or be empty)")
    p.add_argument("--mesh", help="shard params while importing, e.g. fsdp=8")
    p.add_argument("--force", action="store_true", help="write into a non-empty checkpoint folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("export-hf", help="lwm-jax checkpoint -> Hugging Face Llama folder",
                       description="Writes safetensors (sharded past --max-shard-size, with an "
                                   "index), config.json with the checkpoint's rope_theta and "
                                   "max_position_embeddings, generation_config.json and, with "
                                   "--tokenizer, the tokenizer files.")
    p.add_argument("ckpt", help="checkpoint folder (latest step is used), or a train workdir with --stage")
    p.add_argument("out_dir", help="output folder (must not exist or be empty unless --force)")
    p.add_argument("--stage", metavar="NAME", help="CKPT is a train workdir: export this stage's last checkpoint "
                                                   "and write a model card (README.md) with its seq_len and theta")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                   help="weight dtype in the safetensors files (default bfloat16)")
    p.add_argument("--tokenizer", metavar="DIR", help="copy tokenizer.json / tokenizer_config.json from DIR")
    p.add_argument("--max-shard-size", default="5GB", help="split weights into files of at most this size")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("eval", help="evaluate a checkpoint (ppl)")
    evals = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    e = evals.add_parser("ppl", help="mean next-token NLL on token sequences",
                         description="Mean next-token negative log-likelihood of CKPT on the "
                                     "[batch, seq] int token ids in --tokens FILE.npy.")
    e.add_argument("ckpt", help="checkpoint folder")
    e.add_argument("--tokens", required=True, metavar="FILE.npy", help="int token ids [batch, seq]")
    e.add_argument("--attention", choices=("reference", "blockwise", "ring"),
                   help="attention implementation (default: the checkpoint's)")
    e.add_argument("--mesh", help="device mesh, e.g. dp=2,sp=4 (product = device count)")
    e.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval_ppl)

    p = sub.add_parser("export-gguf", help="lwm-jax checkpoint -> GGUF file for llama.cpp",
                       description="Writes one GGUF file for llama.cpp (llama architecture): the weights "
                                   "(f32, f16 or q8_0; norms stay f32), context length = the checkpoint's "
                                   "max_position_embeddings, rope freq base = its theta, and the Llama-3 "
                                   "tokenizer from DIR (BPE tokens, merges, special ids, chat template). "
                                   "The file is written under a temporary name and renamed when complete.")
    p.add_argument("ckpt", help="checkpoint folder (latest step is used)")
    p.add_argument("out", metavar="OUT.gguf", help="output file (must not exist unless --force)")
    p.add_argument("--tokenizer", metavar="DIR", required=True,
                   help="Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json); "
                        "its vocab must match the model's")
    p.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f16",
                   help="weight type of the matrices (default f16); q8_0 is 8-bit, about half of f16's size")
    p.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser("train", help="run a progressive context-extension recipe",
                       description="Trains the stages of RECIPE in order (each from the previous stage's "
                                   "final params, with its own seq_len and RoPE theta). The whole recipe is "
                                   "checked against the devices before anything compiles. Rerunning the same "
                                   "command resumes an unfinished stage exactly and skips finished ones. "
                                   "Writes WORKDIR/metrics.jsonl, TensorBoard events and orbax checkpoints.")
    p.add_argument("recipe", help="recipe YAML, e.g. configs/recipes/demo_cpu.yaml")
    p.add_argument("--stage", metavar="NAME", help="run only this stage (its init source must exist)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set stages.base.steps=3 --set model.remat=none")
    p.add_argument("--workdir", metavar="DIR", help="run folder (default runs/<recipe name>)")
    p.add_argument("--profile", metavar="START:END", help="write a JAX profiler trace of these steps to WORKDIR/profile")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="memory and time per stage and device, on paper or compiled",
                       description="Per stage and device: params, optimizer state, gradients, activations kept "
                                   "by the remat policy, ring buffers, the loss chunk, the total and whether it "
                                   "fits; estimated step time from FLOPs and link bandwidths. --aot compiles the "
                                   "real train step for each stage's mesh on simulated CPU devices (nothing runs) "
                                   "and reports XLA's per-device memory next to the analytic figure.")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--stage", metavar="NAME", help="plan only this stage")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--devices", type=int, metavar="N", help="device count for every stage (default: each stage's mesh)")
    p.add_argument("--hardware", default="L40S", help="device kind: L40S (default), H100, A100, 'TPU v5p'")
    p.add_argument("--device-memory", type=float, metavar="GIB", help="override the device memory")
    p.add_argument("--peak-tflops", type=float, metavar="F", help="override the dense bf16 peak per device")
    p.add_argument("--efficiency", type=float, metavar="X", help="fraction of peak reached (default 0.4)")
    p.add_argument("--aot", action="store_true", help="also compile each stage with XLA (slow for large meshes)")
    p.add_argument("--aot-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)

    _register_groups(sub)
    return parser


def _register_groups(sub) -> None:
    """Adds command groups that live next to their library code (`data prepare`, `data sample`)."""
    from lwm_jax.data import commands as data_commands

    data_commands.register(sub)


def set_cpu_devices(n: int) -> None:
    """Makes JAX simulate `n` CPU devices; JAX refuses if its backends already started."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as err:
        raise UserError(f"--cpu-devices must be applied before JAX initialises ({err})") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.cpu_devices is not None:
            if args.cpu_devices < 1:
                raise UserError(f"--cpu-devices={args.cpu_devices} must be >= 1")
            set_cpu_devices(args.cpu_devices)
        from lwm_jax.parallel.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)
        return args.func(args)
    except UserError as err:
        print(f"lwm-jax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
