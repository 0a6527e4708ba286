"""`lwm-jax eval ppl|niah|passkey|ruler` and `theta-sweep`: checkpoint evaluations. Parsing and
printing only; the runs and their JSON + PNG files are `lwm_jax.eval.reports`.
"""

from __future__ import annotations

import math

from lwm_jax.cli.common import add_json, add_runtime_options, command, mesh_from_args, print_result, runtime_from_args
from lwm_jax.errors import UserError
from lwm_jax.eval.reports import ppl_report, probe_report, theta_sweep_report
from lwm_jax.eval.scoring import TEMPERATURES, parse_depths, parse_lengths
from lwm_jax.eval.theta_sweep import sweep_table

# The one length rule (lwm_jax.model.context), as every --help here states it.
LENGTH_RULE = ("Inputs past the checkpoint's max_position_embeddings (its trained length) run with a warning on "
               "stderr: the model extrapolates there.")
NO_MESH = "Without --mesh a ring checkpoint runs blockwise attention on one device (the same attention)."
ANY_LENGTH = ("Any sequence length runs on any mesh: each sequence is padded at its end to the length the attention's "
              "layout accepts (and the batch to the mesh's data axes); the padding is a segment of its own that no "
              "real token attends to, with loss weight 0, so it is never scored.")

PROBES = {
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


def _perplexity(nll: float) -> float:
    return math.exp(min(nll, 700.0))


def _ppl_lines(result: dict) -> list[str]:
    if "buckets" not in result:
        return [f"mean NLL {result['mean_nll']:.6f} over {result['tokens']:,} predicted tokens "
                f"(perplexity {_perplexity(result['mean_nll']):.3f})"]
    lines = [f"{'positions':>22} {'tokens':>10} {'mean NLL':>9}"]
    for b in result["buckets"]:
        nll = f"{b['mean_nll']:.4f}" if b["mean_nll"] is not None else "-"
        lines.append(f"{b['start']:>10,} - {b['end']:>9,} {b['tokens']:>10,} {nll:>9}")
    lines.append(f"mean NLL {result['mean_nll']:.6f} over {result['tokens']:,} predicted tokens "
                 f"(perplexity {_perplexity(result['mean_nll']):.3f})")
    return lines


def cmd_eval_ppl(args) -> int:
    """Mean next-token negative log-likelihood of CKPT on the [batch, seq] int token ids in --tokens
    FILE.npy, or on --data cut into --num-sequences x --seq-len tokens, by position bucket (0-1K,
    1K-4K, 4K-16K, ... x4, the last bucket ending at the sequence length)."""
    if (args.tokens is None) == (args.data is None):
        raise UserError("give exactly one of --tokens FILE.npy or --data FILE|DIR ...")
    if args.attention == "ring" and not args.mesh:
        raise UserError("--attention ring needs a mesh with an sp axis, e.g. --mesh dp=2,sp=4")
    result = ppl_report(args.ckpt, tokens=args.tokens, data=args.data, tokenizer=args.tokenizer,
                        seq_len=args.seq_len, num_sequences=args.num_sequences, buckets=args.buckets,
                        out=args.out, mesh=mesh_from_args(args), **runtime_from_args(args))
    print_result(args, result, _ppl_lines(result))
    return 0


def _probe_lines(task: str, result: dict) -> list[str]:
    lines = [f"{task} exact match by length (teacher-forced):"]
    lines += [f"  {int(n):>10,}  {score:6.1%}" for n, score in result["by_length"].items()]
    if "generated_by_length" in result:
        lines += ["generated:"] + [f"  {int(n):>10,}  {v:6.1%}" for n, v in result["generated_by_length"].items()]
    lines.append(f"overall {result['score']:.1%}; wrote {', '.join(result['files'].values())}")
    return lines


def cmd_eval_probe(args) -> int:
    """`eval niah|passkey|ruler`: the probe grid over lengths (x depths or tasks), written as JSON + PNG."""
    task = args.eval_command
    depths = parse_depths(args.depths) if getattr(args, "depths", None) else None
    tasks = args.tasks.split(",") if getattr(args, "tasks", None) else None
    result = probe_report(task, args.ckpt, args.tokenizer, lengths=parse_lengths(args.lengths), out=args.out,
                          depths=depths, tasks=tasks, haystack=getattr(args, "haystack", None),
                          samples=args.samples, seed=args.seed, chat=args.chat, generate=args.generate,
                          max_length=args.max_length, temperature=args.temperature, mesh=mesh_from_args(args),
                          **runtime_from_args(args))
    summary = {k: v for k, v in result.items() if k != "cells"}
    if task == "ruler":
        summary["by_task"] = result["by_task"]
    print_result(args, summary, _probe_lines(task, result))
    return 0


def cmd_theta_sweep(args) -> int:
    """Long-context mean NLL of CKPT's weights at each candidate theta (only the rotary base
    changes): --candidates, or NUM log-spaced values over [c/SPAN, c*SPAN] around the scaling-law
    value c for --context, or --search (golden-section in log theta over the same bracket). Prints a
    table and the best theta; with --out writes theta_sweep.json and theta_sweep.png."""
    if args.candidates and args.search:
        raise UserError("give --candidates or --search, not both")
    candidates = None
    if args.candidates:
        try:
            candidates = [float(x) for x in args.candidates.split(",")]
        except ValueError:
            raise UserError(f"--candidates {args.candidates!r} must be comma-separated numbers") from None
    if args.attention == "ring" and not args.mesh:
        raise UserError("--attention ring needs a mesh with an sp axis, e.g. --mesh sp=4")
    result = theta_sweep_report(args.ckpt, args.data, context=args.context, candidates=candidates,
                                search=args.search, num=args.num, span=args.span, iterations=args.iterations,
                                num_sequences=args.num_sequences, tokenizer=args.tokenizer, out=args.out,
                                mesh=mesh_from_args(args), **runtime_from_args(args))
    print_result(args, result, sweep_table(result))
    return 0


def _add_ppl(evals) -> None:
    e = command(evals, "ppl", cmd_eval_ppl, help="mean next-token NLL on token sequences",
                epilog=f"{LENGTH_RULE} {ANY_LENGTH} {NO_MESH}")
    e.add_argument("ckpt", help="checkpoint folder")
    e.add_argument("--tokens", metavar="FILE.npy", help="int token ids [seq] or [batch, seq], any seq and batch")
    e.add_argument("--data", nargs="+", metavar="PATH",
                   help="instead of --tokens: .npy, text or .jsonl[.zst|.gz] files (with --tokenizer) or prepared "
                        "dataset folders, cut into --num-sequences x --seq-len tokens; reports loss by position")
    e.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder for text --data")
    e.add_argument("--seq-len", type=int, help="sequence length for --data (default: max_position_embeddings; "
                                               "longer runs with a warning)")
    e.add_argument("--num-sequences", type=int, default=8, help="sequences for --data (default 8)")
    e.add_argument("--buckets", help="loss by position bucket edges, e.g. 1024,4096,16384 (default: 0-1K, 1K-4K, "
                                     "... x4 up to the sequence length; one bucket for sequences up to 1K)")
    e.add_argument("--out", metavar="DIR", help="write ppl.json and ppl.png (loss by position) here")
    add_runtime_options(e)


def _add_probe(evals, name: str) -> None:
    """One of the `eval niah|passkey|ruler` sub-parsers (same model/tokenizer/mesh options)."""
    help_text, description = PROBES[name]
    e = evals.add_parser(name, help=help_text, description=description,
                         epilog="Lengths past --max-length are refused: a retrieval score is read as the "
                                "model's within its context, so scoring past the trained length is asked for "
                                f"explicitly; a larger --max-length does that, with the warning. {ANY_LENGTH} "
                                f"{NO_MESH}")
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
                   help="longest length accepted (default: the checkpoint's max_position_embeddings); past the "
                        "trained length with a warning")
    e.add_argument("--temperature", choices=TEMPERATURES, default="none",
                   help="log-n: past the trained length T, attention logits times ln(length)/ln(T) (the same "
                        "weights; keeps attention as sharp over the longer context; teacher-forced scores only). "
                        "Default none")
    e.add_argument("--out", required=True, metavar="DIR", help="output folder for JSON and PNG")
    add_runtime_options(e)
    add_json(e)
    e.set_defaults(func=cmd_eval_probe)


def _add_theta_sweep(sub) -> None:
    p = command(sub, "theta-sweep", cmd_theta_sweep, help="loss at candidate RoPE thetas, without training",
                epilog=f"{LENGTH_RULE} (For a sweep that is the point: --context is the target length.) "
                       f"{ANY_LENGTH} {NO_MESH}")
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
    add_runtime_options(p)
    p.add_argument("--out", metavar="DIR", help="write theta_sweep.json and theta_sweep.png here")


def register(sub) -> None:
    """Adds `eval` (with `ppl`, `niah`, `passkey`, `ruler`) and `theta-sweep`."""
    p = sub.add_parser("eval", help="evaluate a checkpoint (ppl, niah, passkey, ruler)")
    evals = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    _add_ppl(evals)
    for name in PROBES:
        _add_probe(evals, name)
    _add_theta_sweep(sub)
