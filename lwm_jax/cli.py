"""The `lwm-jax` command: one sub-command per job, each a thin layer over the library.

JAX is imported only inside command handlers, after `--cpu-devices` has set `XLA_FLAGS`, because
the number of simulated CPU devices is fixed when JAX initialises.
"""

from __future__ import annotations

import argparse
import contextlib
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
    if getattr(args, "attention_kernel", None):
        runtime["attention_kernel"] = args.attention_kernel
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

    if (args.tokens is None) == (args.data is None):
        raise UserError("give exactly one of --tokens FILE.npy or --data FILE|DIR ...")
    meta = read_metadata(args.ckpt)
    vocab = meta["model"]["vocab_size"]
    if args.tokens is not None:
        tokens = load_tokens(args.tokens, vocab)
    else:
        from lwm_jax.eval.perplexity import load_eval_data

        tokens = load_eval_data(args.data, args.seq_len or meta["max_position_embeddings"], args.num_sequences,
                                vocab, args.tokenizer)
    mesh = _mesh(args)
    if args.attention == "ring" and mesh is None:
        raise UserError("--attention ring needs a mesh with an sp axis, e.g. --mesh dp=2,sp=4")
    import jax

    if args.data is not None or args.buckets is not None or args.out is not None:
        return _ppl_by_position(args, tokens, mesh)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        model, _ = load_model(args.ckpt, mesh=mesh, **_runtime(args))
        nll, count = mean_nll(model, tokens, mesh=mesh)
    _print_result(args, {"mean_nll": nll, "tokens": count},
                  [f"mean NLL {nll:.6f} over {count:,} predicted tokens (perplexity {_exp(nll):.3f})"])
    return 0


def _ppl_by_position(args, tokens, mesh) -> int:
    """`eval ppl` with --data / --buckets / --out: loss per position bucket, JSON and a PNG curve."""
    import jax

    from lwm_jax.eval.perplexity import nll_by_position, parse_buckets
    from lwm_jax.train.checkpoint import load_model

    edges = parse_buckets(args.buckets, tokens.shape[1])
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        model, _ = load_model(args.ckpt, mesh=mesh, **_runtime(args))
        result = nll_by_position(model, tokens, edges, mesh=mesh)
    result.update(sequences=int(tokens.shape[0]), seq_len=int(tokens.shape[1]))
    if args.out:
        from lwm_jax.eval.plots import line_plot

        os.makedirs(args.out, exist_ok=True)
        result["files"] = {"json": os.path.join(args.out, "ppl.json"), "png": os.path.join(args.out, "ppl.png")}
        with open(result["files"]["json"], "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        full = [b for b in result["buckets"] if b["mean_nll"] is not None]
        line_plot({"mean NLL": ([b["end"] for b in full], [b["mean_nll"] for b in full])}, result["files"]["png"],
                  f"loss by position: {os.path.basename(os.path.abspath(args.ckpt))}",
                  "position (bucket end, tokens)", "mean NLL", logx=True)
    lines = [f"{'positions':>22} {'tokens':>10} {'mean NLL':>9}"]
    for b in result["buckets"]:
        nll = f"{b['mean_nll']:.4f}" if b["mean_nll"] is not None else "-"
        lines.append(f"{b['start']:>10,} - {b['end']:>9,} {b['tokens']:>10,} {nll:>9}")
    lines.append(f"mean NLL {result['mean_nll']:.6f} over {result['tokens']:,} predicted tokens "
                 f"(perplexity {_exp(result['mean_nll']):.3f})")
    _print_result(args, result, lines)
    return 0


def _probe_command(args, task: str) -> int:
    """Shared body of `eval niah|passkey|ruler`: set up, run the probe grid, write JSON + PNG, print."""
    from lwm_jax.eval.scoring import parse_depths, parse_lengths, setup_probes

    lengths = parse_lengths(args.lengths)
    mesh = _mesh(args)
    import jax

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        s = setup_probes(args.ckpt, args.tokenizer, mesh=mesh, chat=args.chat, generate=args.generate,
                         max_length=args.max_length, lengths=lengths, **_runtime(args))
        common = dict(lengths=lengths, samples=args.samples, seed=args.seed, chat=s.chat, bos_id=s.info.bos_id,
                      generate_fn=s.generate_fn)
        if task == "niah":
            from lwm_jax.eval.niah import DEFAULT_DEPTHS, load_haystacks, niah_eval

            depths = parse_depths(args.depths) if args.depths else list(DEFAULT_DEPTHS)
            stacks = load_haystacks(args.haystack, s.tokenizer, max(lengths))
            result = niah_eval(s.logits_fn, s.tokenizer, depths=depths, haystacks=stacks, **common)
        elif task == "passkey":
            from lwm_jax.eval.passkey import DEFAULT_DEPTHS, passkey_eval

            depths = parse_depths(args.depths) if args.depths else list(DEFAULT_DEPTHS)
            result = passkey_eval(s.logits_fn, s.tokenizer, depths=depths, **common)
        else:
            from lwm_jax.eval.ruler import ruler_eval

            result = ruler_eval(s.logits_fn, s.tokenizer, tasks=args.tasks.split(",") if args.tasks else None,
                                **common)
    from lwm_jax.eval.niah import write_results

    result["checkpoint"] = os.path.abspath(args.ckpt)
    result["files"] = write_results(result, args.out, task, f"{task}: {os.path.basename(os.path.abspath(args.ckpt))}",
                                    heatmap=task != "passkey")
    lines = [f"{task} exact match by length (teacher-forced):"]
    lines += [f"  {int(n):>10,}  {score:6.1%}" for n, score in result["by_length"].items()]
    if "generated_by_length" in result:
        lines += ["generated:"] + [f"  {int(n):>10,}  {v:6.1%}" for n, v in result["generated_by_length"].items()]
    lines.append(f"overall {result['score']:.1%}; wrote {', '.join(result['files'].values())}")
    summary = {k: v for k, v in result.items() if k != "cells"}
    if task == "ruler":
        summary["by_task"] = result["by_task"]
    _print_result(args, summary, lines)
    return 0


def cmd_eval_niah(args) -> int:
    return _probe_command(args, "niah")


def cmd_eval_passkey(args) -> int:
    return _probe_command(args, "passkey")


def cmd_eval_ruler(args) -> int:
    return _probe_command(args, "ruler")


def _add_probe_parsers(evals) -> None:
    """The `eval niah|passkey|ruler` sub-parsers (same model/tokenizer/mesh options)."""
    about = {
        "niah": ("needle-in-a-haystack heatmap over lengths x depths",
                 "Hides 'One of the special magic numbers for KEY is: NNNNNNN.' at a sentence boundary of a "
                 "haystack (the demo corpus's docstrings by default, or --haystack files; never repeated), asks "
                 "for it, and scores the 7-digit answer teacher-forced (every answer token the argmax). The "
                 "total length (chat template, question and answer included) is the asked length. Writes "
                 "OUT/niah.json (every cell and sample) and OUT/niah.png (x: length, y: depth %, colour: score)."),
        "passkey": ("passkey retrieval accuracy by length",
                    "The classic task: a random 5-digit pass key inside repeated filler text at several depths, "
                    "scored by exact match (teacher-forced). Writes OUT/passkey.json and OUT/passkey.png."),
        "ruler": ("RULER subset: multi-needle, variable tracking, common words",
                  "RULER-style tasks (niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt, cwe) "
                  "scored by exact match, by length. Writes OUT/ruler.json and OUT/ruler.png (task x length)."),
    }
    for name, (help_text, description) in about.items():
        e = evals.add_parser(name, help=help_text, description=description)
        e.add_argument("ckpt", help="checkpoint folder")
        e.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer folder (tokenizer.json)")
        e.add_argument("--lengths", required=True, help="total context lengths in tokens, e.g. 1K,4K,16K")
        if name != "ruler":
            e.add_argument("--depths", help="needle depths in percent (default: 0,10,...,100 for niah; "
                                            "0,25,50,75,100 for passkey)")
        else:
            e.add_argument("--tasks", help="comma-separated subset of the tasks (default: all)")
        if name == "niah":
            e.add_argument("--haystack", nargs="+", metavar="FILE",
                           help="haystack text files (.txt, or .jsonl[.zst|.gz] with a text field); sample k uses "
                                "file k mod N (default: the demo corpus)")
        e.add_argument("--samples", type=int, default=1, metavar="K", help="probes per cell (default 1)")
        e.add_argument("--seed", type=int, default=0, help="seed of keys, numbers and needles (default 0)")
        e.add_argument("--chat", action="store_true", help="wrap each probe in the tokenizer's chat template")
        e.add_argument("--generate", action="store_true",
                       help="also score the greedy generated answer (needs lwm_jax.generate)")
        e.add_argument("--max-length", type=int, metavar="N",
                       help="longest length accepted (default: the checkpoint's max_position_embeddings)")
        e.add_argument("--out", required=True, metavar="DIR", help="output folder for JSON and PNG")
        _add_runtime_options(e)
        _add_json(e)
        e.set_defaults(func={"niah": cmd_eval_niah, "passkey": cmd_eval_passkey, "ruler": cmd_eval_ruler}[name])


def cmd_generate(args) -> int:
    from lwm_jax.generate import generate_command

    sample = args.temperature is not None or args.top_p is not None
    if sample and args.greedy:
        raise UserError("--greedy cannot be combined with --temperature / --top-p (they sample)")
    result = generate_command(args.ckpt, prompt=args.prompt, tokens=args.tokens, tokenizer=args.tokenizer,
                              chat=args.chat, max_new_tokens=args.max_new_tokens, greedy=not sample,
                              temperature=1.0 if args.temperature is None else args.temperature,
                              top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed,
                              mesh=_mesh(args), attention=args.attention,
                              device_memory_gib=args.device_memory)
    text = result.get("text")
    _print_result(args, result, [text if text is not None else " ".join(map(str, result["new_tokens"]))])
    return 0


def cmd_theta_sweep(args) -> int:
    from lwm_jax.eval.perplexity import load_eval_data
    from lwm_jax.eval.theta_sweep import save_sweep, sweep_table, theta_sweep
    from lwm_jax.train.checkpoint import load_model, read_metadata

    if args.candidates and args.search:
        raise UserError("give --candidates or --search, not both")
    candidates = None
    if args.candidates:
        try:
            candidates = [float(x) for x in args.candidates.split(",")]
        except ValueError:
            raise UserError(f"--candidates {args.candidates!r} must be comma-separated numbers") from None
    meta = read_metadata(args.ckpt)
    tokens = load_eval_data(args.data, args.context, args.num_sequences, meta["model"]["vocab_size"], args.tokenizer)
    mesh = _mesh(args)
    if args.attention == "ring" and mesh is None:
        raise UserError("--attention ring needs a mesh with an sp axis, e.g. --mesh sp=4")
    import jax

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        model, _ = load_model(args.ckpt, mesh=mesh, **_runtime(args))
        result = theta_sweep(model, tokens, context=args.context, candidates=candidates, search=args.search,
                             num=args.num, span=args.span, iterations=args.iterations,
                             orig_context=meta["max_position_embeddings"], mesh=mesh)
    if args.out:
        result["files"] = save_sweep(result, args.out)
    lines = sweep_table(result)
    _print_result(args, result, lines)
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
    # --aot compiles for XLA:CPU, which holds bf16 as float32: its figure is set beside the analytic
    # one at 4-byte activations ("paper@cpu"), not beside the accelerator's.
    lines = [f"{hw.name}: {hw.memory_gib:g} GiB, {hw.peak_tflops:g} TFLOP/s at {hw.efficiency:.0%} efficiency",
             f"{'stage':>7} {'seq_len':>10} {'devices':>7} {'GiB/device':>10} {'fits':>5} {'step s':>8} {'minutes':>8}"
             + (f" {'paper@cpu':>9} {'aot GiB':>8}" if args.aot else "")]
    for s in stages:
        aot = (f" {s['memory_bytes_per_device_xla_cpu'] / gib:>9.2f} {s['aot_memory_bytes_per_device'] / gib:>8.2f}"
               if args.aot else "")
        lines.append(f"{s['name']:>7} {s['seq_len']:>10,} {s['devices']:>7} {s['memory_bytes_per_device'] / gib:>10.2f} "
                     f"{'yes' if s['fits'] else 'NO':>5} {s['step_s']:>8.1f} {s['estimated_minutes']:>8.1f}{aot}")
    _print_result(args, {"hardware": dataclasses.asdict(hw), "stages": stages}, lines)
    return 0


def _exp(x: float) -> float:
    import math

    return math.exp(min(x, 700.0))


# Parser -----------------------------------------------------------------------------------------


def _add_runtime_options(p, dtype: bool = True) -> None:
    """`--attention`, `--attention-kernel`, `--mesh` (and `--dtype`): how a checkpoint runs, shared
    by the evaluations."""
    from lwm_jax.config import ATTENTION_KERNELS

    p.add_argument("--attention", choices=("reference", "blockwise", "ring"),
                   help="attention implementation (default: the checkpoint's)")
    p.add_argument("--attention-kernel", choices=ATTENTION_KERNELS,
                   help="per-block kernel of blockwise/ring: auto picks cuDNN (GPU, bf16) or the pure-JAX "
                        "xla kernel (default: the checkpoint's)")
    p.add_argument("--mesh", help="device mesh, e.g. dp=2,sp=4 (product = device count)")
    if dtype:
        p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)")


def _add_json(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


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
    _add_json(p)
    p.set_defaults(func=cmd_theta)

    p = sub.add_parser("import-hf", help="Hugging Face Llama folder -> lwm-jax orbax checkpoint",
                       description="Reads config.json and safetensors weights (single or sharded "
                                   "with model.safetensors.index.json) and writes an orbax checkpoint "
                                   "with metadata. Pickle (.bin) weights are refused.")
    p.add_argument("hf_dir", help="Hugging Face model folder")
    p.add_argument("ckpt", help="output checkpoint folder (must not exist or be empty)")
    p.add_argument("--mesh", help="shard params while importing, e.g. fsdp=8")
    p.add_argument("--force", action="store_true", help="write into a non-empty checkpoint folder")
    _add_json(p)
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
    _add_json(p)
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("eval", help="evaluate a checkpoint (ppl, niah, passkey, ruler)")
    evals = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    e = evals.add_parser("ppl", help="mean next-token NLL on token sequences",
                         description="Mean next-token negative log-likelihood of CKPT on the "
                                     "[batch, seq] int token ids in --tokens FILE.npy.")
    e.add_argument("ckpt", help="checkpoint folder")
    e.add_argument("--tokens", metavar="FILE.npy", help="int token ids [batch, seq]")
    e.add_argument("--data", nargs="+", metavar="PATH",
                   help="instead of --tokens: .npy, text or .jsonl[.zst|.gz] files (with --tokenizer) or prepared "
                        "dataset folders, cut into --num-sequences x --seq-len tokens; reports loss by position")
    e.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder for text --data")
    e.add_argument("--seq-len", type=int, help="sequence length for --data (default: max_position_embeddings)")
    e.add_argument("--num-sequences", type=int, default=8, help="sequences for --data (default 8)")
    e.add_argument("--buckets", help="loss by position bucket edges, e.g. 1024,4096,16384 (default: 0-1K, 1K-4K, "
                                     "... x4 up to the sequence length)")
    e.add_argument("--out", metavar="DIR", help="write ppl.json and ppl.png (loss by position) here")
    _add_runtime_options(e)
    _add_json(e)
    e.set_defaults(func=cmd_eval_ppl)
    _add_probe_parsers(evals)

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
    _add_json(p)
    p.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser("generate", help="KV-cache generation from a checkpoint",
                       description="Prefills the prompt (with ring attention over sp when --mesh has sp > 1) "
                                   "and decodes with a KV cache sharded over sp, each device's partial softmax "
                                   "combined across sp (flash-decoding). Stops at the model's EOS ids and, "
                                   "with --tokenizer, <|eot_id|>.")
    p.add_argument("ckpt", help="checkpoint folder (latest step is used)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text (needs --tokenizer)")
    src.add_argument("--tokens", metavar="FILE.npy", help="prompt token ids [seq] or [1, seq]")
    p.add_argument("--tokenizer", metavar="DIR", help="Hugging Face tokenizer folder (tokenizer.json)")
    p.add_argument("--chat", action="store_true", help="wrap --prompt as a user turn with the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="tokens to generate (default 256)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    p.add_argument("--temperature", type=float, metavar="T", help="sample at this temperature (default 1 with --top-p)")
    p.add_argument("--top-p", type=float, metavar="P", help="sample from the top-p mass (default 1 with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--mesh", help="device mesh, e.g. dp=2,sp=4 (product = device count)")
    p.add_argument("--attention", choices=("reference", "blockwise", "ring"),
                   help="prefill attention (default: ring when the mesh has sp > 1, else blockwise)")
    p.add_argument("--device-memory", type=float, metavar="GIB",
                   help="memory of one device for the fits check (default: what the device reports)")
    _add_json(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("theta-sweep", help="loss at candidate RoPE thetas, without training",
                       description="Long-context mean NLL of CKPT's weights at each candidate theta (only the "
                                   "rotary base changes): --candidates, or NUM log-spaced values over "
                                   "[c/SPAN, c*SPAN] around the scaling-law value c for --context, or --search "
                                   "(golden-section in log theta over the same bracket). Prints a table and the "
                                   "best theta; with --out writes theta_sweep.json and theta_sweep.png.")
    p.add_argument("ckpt", help="checkpoint folder")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help=".npy, text or .jsonl[.zst|.gz] files (with --tokenizer) or prepared dataset folders")
    p.add_argument("--context", type=int, required=True, help="sequence length to measure the loss at")
    p.add_argument("--candidates", help="comma-separated thetas to try")
    p.add_argument("--search", action="store_true", help="golden-section search in log theta")
    p.add_argument("--num", type=int, default=7, help="log-spaced candidates (default 7)")
    p.add_argument("--span", type=float, default=8.0, help="bracket factor around the scaling-law value (default 8)")
    p.add_argument("--iterations", type=int, default=10, help="loss evaluations of --search (default 10)")
    p.add_argument("--num-sequences", type=int, default=4, help="sequences of --context tokens (default 4)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder for text --data")
    _add_runtime_options(p)
    p.add_argument("--out", metavar="DIR", help="write theta_sweep.json and theta_sweep.png here")
    _add_json(p)
    p.set_defaults(func=cmd_theta_sweep)

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
    _add_json(p)
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
    _add_json(p)
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
