"""Evaluation runs from a checkpoint to a report: load the model (on a mesh), run perplexity, the
probes or the theta sweep, and write the JSON + PNG files. What the `lwm-jax eval` and
`theta-sweep` commands call, so the CLI only parses and prints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from lwm_jax.errors import UserError
from lwm_jax.eval import niah, passkey, ruler
from lwm_jax.eval.perplexity import load_eval_data, load_tokens, mean_nll, nll_by_position, parse_buckets
from lwm_jax.eval.plots import line_plot, short_length
from lwm_jax.eval.scoring import setup_probes
from lwm_jax.eval.theta_sweep import save_sweep, theta_sweep
from lwm_jax.model.opened import open_checkpoint
from lwm_jax.outputs import check_output_dir, staged_folder
from lwm_jax.parallel.mesh import use_mesh


def _name(ckpt: str) -> str:
    return os.path.basename(os.path.abspath(ckpt))


def checkpoint_title(task: str, ckpt: str, meta: dict, lengths: Sequence[int]) -> str:
    """A plot title naming the model (its recipe, else the folder), stage, theta, trained length and
    the lengths scored: "niah: demo_cpu stage x4, theta 1,195,364, trained at 1,024, scored at 4K"."""
    parts = [f"{task}: {meta.get('recipe') or _name(ckpt)}"]
    if meta.get("stage"):
        parts[0] += f" stage {meta['stage']}"
    theta = meta.get("rope_theta")  # `model_metadata` writes it beside the config
    if theta is not None:
        parts.append(f"theta {theta:,.0f}" if theta < 1e7 else f"theta {theta:.3g}")
    trained = meta.get("seq_len") or meta.get("max_position_embeddings")
    if trained:
        parts.append(f"trained at {trained:,}")
    if lengths:
        parts.append(f"scored at {', '.join(short_length(n) for n in lengths)}")
    return ", ".join(parts)


def write_ppl_report(result: dict, out_dir: str, title: str) -> dict[str, str]:
    """Writes OUT/ppl.json (the result, with the file paths) and OUT/ppl.png (mean NLL by bucket end,
    log x; buckets without tokens are left out), both or neither (`staged_folder`); returns the paths."""
    files = {"json": os.path.join(out_dir, "ppl.json"), "png": os.path.join(out_dir, "ppl.png")}
    with staged_folder(out_dir) as stage:
        with open(stage / "ppl.json", "w", encoding="utf-8") as f:
            json.dump({**result, "files": files}, f, indent=1)
        full = [b for b in result["buckets"] if b["mean_nll"] is not None]
        line_plot({"mean NLL": ([b["end"] for b in full], [b["mean_nll"] for b in full])}, stage / "ppl.png", title,
                  "position (bucket end, tokens)", "mean NLL", logx=True)
    return files


def write_probe_report(result: dict, out_dir: str, task: str, title: str) -> dict[str, str]:
    """Writes OUT/{task}.json and OUT/{task}.png (a heatmap, or for passkey a curve by length)."""
    return niah.write_results(result, out_dir, task, title, heatmap=task != "passkey")


def ppl_report(ckpt: str, *, tokens: str | None = None, data: Sequence[str] | None = None,
               tokenizer: str | None = None, seq_len: int | None = None, num_sequences: int = 8,
               buckets: str | None = None, out: str | None = None, mesh=None, **runtime) -> dict:
    """Mean next-token NLL of `ckpt` on a `tokens` .npy file or on `data` cut into sequences.

    With `data`, `buckets` or `out` the loss is also split by position bucket (the result then has
    `buckets`, `sequences` and `seq_len`), and with `out` written by `write_ppl_report`. Sequences
    past the checkpoint's max_position_embeddings are measured, with a warning (`check_context`).
    """
    if out:
        check_output_dir(out, "--out")
    opened = open_checkpoint(ckpt, mesh, **runtime)
    vocab = opened.config.vocab_size
    if seq_len is not None and seq_len < 2:
        raise UserError(f"--seq-len={seq_len} must be >= 2 (one next-token prediction)")
    if tokens is not None:
        ids = load_tokens(tokens, vocab)
    else:
        ids = load_eval_data(data, seq_len or opened.trained_length, num_sequences, vocab, tokenizer)
    opened.check_context(int(ids.shape[1]), what="sequence length")
    by_position = data is not None or buckets is not None or out is not None
    edges = parse_buckets(buckets, ids.shape[1]) if by_position else None
    with use_mesh(mesh):
        model = opened.model()
        if not by_position:
            nll, count = mean_nll(model, ids, mesh=mesh)
            return {"mean_nll": nll, "tokens": count}
        result = nll_by_position(model, ids, edges, mesh=mesh)
    result.update(sequences=int(ids.shape[0]), seq_len=int(ids.shape[1]))
    if out:
        result["files"] = write_ppl_report(result, out, f"loss by position: {_name(ckpt)}")
    return result


def _run_probes(task: str, s, lengths, depths, tasks, haystack, common: dict) -> dict:
    if task == "niah":
        stacks = niah.load_haystacks(haystack, s.tokenizer, max(lengths))
        return niah.niah_eval(s.logits_fn, s.tokenizer, depths=list(depths or niah.DEFAULT_DEPTHS),
                              haystacks=stacks, **common)
    if task == "passkey":
        return passkey.passkey_eval(s.logits_fn, s.tokenizer, depths=list(depths or passkey.DEFAULT_DEPTHS),
                                    **common)
    return ruler.ruler_eval(s.logits_fn, s.tokenizer, tasks=tasks, **common)


def probe_report(task: str, ckpt: str, tokenizer: str, *, lengths: Sequence[int], out: str,
                 depths: Sequence[float] | None = None, tasks: Sequence[str] | None = None,
                 haystack: Sequence[str] | None = None, samples: int = 1, seed: int = 0, chat: bool = False,
                 generate: bool = False, max_length: int | None = None, temperature: str = "none", mesh=None,
                 **runtime) -> dict:
    """Runs the `niah`, `passkey` or `ruler` grid on `ckpt` and writes it with `write_probe_report`.

    `depths` default to the task's own; `temperature` "log-n" scores past the trained length with
    the log-n attention temperature. The result gains `checkpoint`, `temperature` and `files`.
    """
    check_output_dir(out, "--out")
    with use_mesh(mesh):
        s = setup_probes(ckpt, tokenizer, mesh=mesh, chat=chat, generate=generate, max_length=max_length,
                         lengths=lengths, temperature=temperature, **runtime)
        common = dict(lengths=lengths, samples=samples, seed=seed, chat=s.chat, bos_id=s.info.bos_id,
                      generate_fn=s.generate_fn)
        result = _run_probes(task, s, lengths, depths, tasks, haystack, common)
    result["checkpoint"] = os.path.abspath(ckpt)
    result["temperature"] = temperature
    result["title"] = checkpoint_title(task, ckpt, s.meta, lengths) + (
        ", log-n temperature past the trained length" if temperature == "log-n" else "")
    result["files"] = write_probe_report(result, out, task, result["title"])
    return result


def theta_sweep_report(ckpt: str, data: Sequence[str], *, context: int, candidates: Sequence[float] | None = None,
                       search: bool = False, num: int = 7, span: float = 8.0, iterations: int = 10,
                       num_sequences: int = 4, tokenizer: str | None = None, out: str | None = None, mesh=None,
                       **runtime) -> dict:
    """Loss of `ckpt` at candidate RoPE thetas on `data` (see `theta_sweep`); with `out` also writes
    theta_sweep.json and theta_sweep.png there (the result gains `files`)."""
    if out:
        check_output_dir(out, "--out")
    if context < 2:
        raise UserError(f"--context={context} must be >= 2 (one next-token prediction)")
    opened = open_checkpoint(ckpt, mesh, **runtime)
    opened.check_context(context, what="context")
    tokens = load_eval_data(data, context, num_sequences, opened.config.vocab_size, tokenizer)
    with use_mesh(mesh):
        result = theta_sweep(opened.model(), tokens, context=context, candidates=candidates, search=search,
                             num=num, span=span, iterations=iterations, orig_context=opened.trained_length,
                             mesh=mesh)
    if out:
        result["files"] = save_sweep(result, out)
    return result
