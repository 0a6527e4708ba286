"""A miniature of the seed's claim: a short training at a raised RoPE theta lets a model retrieve
from a context longer than it was trained on, and the same training at the old theta does not.

A small Llama-3-shaped model with a vocabulary made for the task (`data sample --tokenizer task`:
numbers in 2-digit tokens, the probe templates' words, 512 tokens) learns passkey and needle-in-a-
haystack retrieval at a short length L0 (retrieval documents, copy documents and demo-corpus text,
packed by document). Then arms extend it in stages with the same data, steps and optimizer: theta by
the scaling-law rule, by the NTK rule, YaRN scaling (theta kept), and theta unchanged (the control).
Stage xM aims at M x L0: theta (or the YaRN factor) is set for M x L0, and the stage trains at a
quarter of that length (x4 at L0, x16 at 4 x L0), so what each arm scores at M x L0 is what its
RoPE setting carries past the length it trained on. (Trained at the target length itself, or at
half of it, the control learns much of it too in this miniature: measured, see the README.) The
extension data adds copy documents packed continuously, which make the copy precise. Every
checkpoint is scored at L0, 4x and 16x (passkey and NIAH exact match, teacher-forced, probes per
cell with Wilson 95% intervals, heatmaps titled with model, stage, theta and lengths) and its loss
by position. Past its trained length a checkpoint is scored with the log-n attention temperature
(logits times ln(length) / ln(trained length), the same for every arm: without it NIAH's answer is
lost among the 4x more keys in every arm) and without it; the tables show both.

Everything goes through the project's own code: `lwm_jax.data.sample` and `lwm_jax.data.synthetic`
for the tokenizer and documents, `lwm_jax.data.prepare`, `lwm_jax.train.runner.train` for every
stage (recipes built as dicts), `lwm_jax.model.rope.theta_for` for the rules, and the passkey / NIAH
evaluators of `lwm_jax.eval`. Presets: `default` (the full run, README figures), `demo` (what `make
demo` runs: the scaling-law arm against the control, x4 only) and `quick` (a smoke check that
learns nothing). Finished data and stages in OUT are reused when run again (`--fresh` starts over).

    python scripts/mini_extension.py [--preset default|demo|quick] [--out runs/mini_extension] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml
import zstandard

from lwm_jax.config import DataConfig, PrepareConfig, RecipeConfig, from_dict
from lwm_jax.data import manifest
from lwm_jax.data.sample import build_sample
from lwm_jax.data.synthetic import (
    NIAH_TRAIN_SKIP,
    RETRIEVAL_TASKS,
    copy_documents,
    retrieval_documents,
    split_sentences,
)
from lwm_jax.eval.plots import pyplot, short_length

# Modules that import JAX are imported inside the functions that use them: main() configures JAX
# first (XLA_FLAGS, jax_num_cpu_devices), and --help stays instant.

ROOT = Path(__file__).resolve().parents[1]
# name -> the theta rule of its stages; the yarn arm keeps theta and scales RoPE with YaRN instead.
ARMS = {"scaling-law": "scaling-law", "ntk": "ntk", "yarn": "yarn", "control": None}
TASKS = RETRIEVAL_TASKS  # ("passkey", "niah")
TEMPERATURES = ("log-n", "none")
EVAL_SEED = 12345  # probes scored are built from other seeds than the training documents
# The claim's checks, per seed: the base retrieves at L0, the raised arm keeps the passkey at 4 x L0,
# and it is that far above the control with their Wilson 95% intervals apart.
MIN_BASE, MIN_RAISED, MIN_GAP = 0.9, 0.8, 0.3


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run (a preset, changed field by field with --set)."""

    l0: int = 128
    base_theta: float = 10_000.0
    tokenizer: str = "task"  # `data sample --tokenizer`: "task" (word-level, made for the probes) or "bpe"
    vocab_size: int = 512
    model: dict = dataclasses.field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32))
    # Base: (seq_len as a fraction of L0, steps, batch, lr, retrieval share, copy share) per phase,
    # each phase a cosine schedule from the previous checkpoint. Copy documents (runs of random
    # number tokens, repeated) teach the copying that retrieval needs.
    curriculum: tuple = ((1.0, 700, 16, 3e-3, 0.7, 0.2), (1.0, 700, 16, 2e-3, 0.7, 0.2))
    # Extension stages, the same for every arm: (target multiple M of L0, training multiple of L0,
    # steps, batch, lr), constant LR after a short warmup.
    extension: tuple = ((4, 1, 100, 32, 5e-4), (16, 4, 100, 4, 5e-4))
    retrieval_share: float = 0.6  # share of extension sequences that are passkey / NIAH documents
    # Share that are copy documents, packed continuously: the neighbours' runs in view make copying
    # precise (passkey misses at 4x were mostly one token off; README calibration).
    extension_copy: float = 0.3
    niah_share: float = 0.7  # of the retrieval documents, the share that are NIAH (the harder task)
    retrieval_docs: int = 1500  # documents generated per task and length (cap; epochs repeat them)
    copy_docs: int = 40_000  # copy documents per length that uses them (~20 tokens each)
    # How probes past a checkpoint's trained length are scored: "log-n" multiplies attention logits by
    # ln(length) / ln(trained length) (the same for every arm; 1 within the trained length), "none"
    # scores the weights as they are. Both are reported when "log-n" is set.
    temperature: str = "log-n"
    eval_depths: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
    eval_samples: int = 8  # probes per cell = depths x samples
    corpus_chars: int = 1_000_000  # demo-corpus text used per source (keeps `prepare` short)
    arms: tuple = tuple(ARMS)  # which of ARMS to train
    position_loss_sequences: int = 8
    # The draw of the training documents (retrieval and copy documents, NIAH haystacks), their order
    # and the model's initialisation. The probes scored stay the same (EVAL_SEED). Seed 0 draws the
    # documents the miniature drew before it had seeds.
    seed: int = 0


PRESETS = {
    "default": Settings(),
    # `make demo`: the same base, the scaling-law arm against the control, x4 only, at half the
    # default x4 batch (the 10-minute bound).
    # Its base at half the default's learning rate: at 3e-3 the base failed to learn retrieval
    # on some draws of the training documents, at 1.5e-3 then 1e-3 it learnt on every seed tried
    # (docs/miniature.md#five-seeds).
    "demo": Settings(curriculum=((1.0, 700, 16, 1.5e-3, 0.7, 0.2), (1.0, 700, 16, 1e-3, 0.7, 0.2)),
                     extension=((4, 1, 100, 16, 5e-4),),
                     arms=("scaling-law", "control"), position_loss_sequences=4),
    "quick": Settings(
        model=dict(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32),
        curriculum=((1.0, 6, 8, 3e-3, 0.5, 0.2),), extension=((4, 1, 2, 8, 5e-4), (16, 4, 2, 2, 5e-4)),
        retrieval_docs=16, copy_docs=200, eval_depths=(0.5,), eval_samples=2, corpus_chars=200_000,
        position_loss_sequences=2),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Results: OUT/results.json, OUT/claim.json, OUT/mini_extension.png, "
                                       "OUT/eval/<checkpoint>/{passkey,niah}.png; the table on stdout.")
    p.add_argument("--out", default=str(ROOT / "runs" / "mini_extension"),
                   help="output folder (default runs/mini_extension, git-ignored)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="default: the full run (about 20 minutes on 2 CPU cores); demo: what `make demo` runs "
                        "(about 6 minutes); quick: a smoke check of about 2 minutes that learns nothing")
    p.add_argument("--quick", action="store_true", help="the same as --preset quick")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    p.add_argument("--devices", type=int, default=1,
                   help="simulated CPU devices, mesh dp=N (default 1: on 2 cores 8 devices were no faster, "
                        "and dp=N needs batches divisible by N)")
    p.add_argument("--fresh", action="store_true", help="delete OUT first (default: reuse finished data and stages)")
    p.add_argument("--seed", type=int, default=None,
                   help="the draw of training documents, their order and the model's initialisation (default 0); "
                        "the probes scored stay the same")
    p.add_argument("--seeds", type=int, default=0, metavar="N",
                   help="run seeds SEED .. SEED+N-1, each in OUT/seed-K, and print the per-seed table with the "
                        "claim's checks (exit status 1 when one fails)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a Settings field (YAML value), e.g. --set l0=256 "
                        "--set 'extension=[[4,1,200,16,1e-3]]' --set 'arms=[scaling-law,control]'")
    return p.parse_args(argv)


def settings_from(args) -> Settings:
    s = PRESETS["quick" if args.quick else args.preset]
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or key not in {f.name for f in dataclasses.fields(Settings)}:
            fields = ", ".join(f.name for f in dataclasses.fields(Settings))
            sys.exit(f"mini_extension: bad --set {item!r} (fields: {fields})")
        value = yaml.safe_load(raw)
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        s = dataclasses.replace(s, **{key: value})
    if args.seed is not None:
        s = dataclasses.replace(s, seed=args.seed)
    unknown = [a for a in s.arms if a not in ARMS]
    if unknown or "control" not in s.arms:
        sys.exit(f"mini_extension: arms={list(s.arms)} must be among {', '.join(ARMS)} and include control")
    if s.temperature not in TEMPERATURES:
        sys.exit(f"mini_extension: temperature={s.temperature!r} must be one of {', '.join(TEMPERATURES)}")
    if any(len(e) != 5 for e in s.extension):
        sys.exit("mini_extension: every extension stage is [target multiple, training multiple, steps, batch, lr]")
    return s


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Data ---------------------------------------------------------------------------------------------


def stage_lengths(s: Settings) -> list[int]:
    base = [int(round(f * s.l0)) for f, *_ in s.curriculum]
    return sorted(set(base + [t * s.l0 for _, t, *_ in s.extension]))


def corpus_subset(sample: Path, out: Path, max_chars: int) -> Path:
    """The demo corpus's leading documents, up to `max_chars` characters per source, as one jsonl."""
    taken: dict[str, int] = {}
    records = []
    for path in sorted((sample / "corpus").glob("*.jsonl.zst")):
        with path.open("rb") as f:
            text = zstandard.ZstdDecompressor().stream_reader(f).read().decode("utf-8")
        for line in text.splitlines():
            record = json.loads(line)
            name = record["meta"]["redpajama_set_name"]
            if taken.get(name, 0) < max_chars:
                taken[name] = taken.get(name, 0) + len(record["text"])
                records.append(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(records) + "\n", encoding="utf-8")
    return out


def build_data(s: Settings, out: Path) -> tuple[Path, dict[int, Path]]:
    """Demo corpus + tokenizer, retrieval documents and one prepared dataset per stage length."""
    from lwm_jax.data.prepare import prepare
    from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info
    from lwm_jax.eval.niah import demo_haystack

    sample = out / "data" / "sample"
    if not (sample / "sample.json").is_file():
        say("demo corpus and tokenizer (lwm-jax data sample)")
        shutil.rmtree(sample, ignore_errors=True)
        build_sample(sample, vocab_size=s.vocab_size, tokenizer=s.tokenizer,
                     max_chars_per_source=max(s.corpus_chars, 1_000_000))
    corpus = out / "data" / "corpus.jsonl"
    if not corpus.is_file():
        corpus_subset(sample, corpus, s.corpus_chars)
    info = load_tokenizer_info(sample / "tokenizer")
    tokenizer = get_tokenizer(info.tokenizer_file)
    sentences = None
    prepared = {}
    longest = max(stage_lengths(s))
    for length in stage_lengths(s):
        target = out / "data" / f"prepared-{length}"
        prepared[length] = target
        if (target / "manifest.json").is_file():
            continue
        if sentences is None:  # one pool for every run whose stages stay within 8 x L0: the demo and the
            # default run then draw the same base documents (NIAH is learnt late, and not from every draw)
            sentences = split_sentences(demo_haystack(NIAH_TRAIN_SKIP * 40 + 20 * max(longest, 8 * s.l0)))
        here = [c for c in s.curriculum if int(round(c[0] * s.l0)) == length]
        sequences = sum(st * b * r for _, st, b, _, r, _ in here)
        sequences += sum(st * b * s.retrieval_share for _, t, st, b, _ in s.extension if t * s.l0 == length)
        count = min(s.retrieval_docs, 16 + int(sequences / len(TASKS)))
        tick = time.time()
        docs = []
        for task in TASKS:
            path = out / "data" / f"retrieval-{length}" / f"{task}.array_record"
            if retrieval_documents(tokenizer, task, length, count, path, bos_id=info.bos_id, seed=1 + s.seed,
                                   sentences=sentences):
                docs.append(f"{task}={path}")
        names = " and ".join(d.split("=")[0] for d in docs) or "no"
        message = f"{length}-token {names} documents: {count} each"
        if any(c[5] for c in here) or (s.extension_copy and any(t * s.l0 == length for _, t, *_ in s.extension)):
            path = out / "data" / f"retrieval-{length}" / "copy.array_record"
            docs.append(f"copy={path}")
            copy_documents(tokenizer, s.copy_docs, path, seed=length + 100_000 * s.seed)
            message += f", {s.copy_docs:,} copy documents"
        say(f"{message} ({time.time() - tick:.0f} s); preparing")
        config = PrepareConfig(seq_len=length, min_doc_tokens=0, short_keep_prob=1.0)
        prepare([str(corpus), *docs], sample / "tokenizer", target, config, overwrite=True)
    return sample, prepared


def data_weights(share: float, prepared: Path, copy: float = 0.0, niah: float = 0.5) -> dict[str, float]:
    """Mixture weights: `share` split over the tasks prepared at that length (`niah` of it to NIAH
    when both are), `copy` to the copy documents, the rest over the corpus sources by their token
    counts."""
    sources = manifest.load_manifest(prepared)["sources"]
    corpus = {n: v["kept_tokens"] for n, v in sources.items() if n not in (*TASKS, "copy")}
    total = sum(corpus.values())
    tasks = [t for t in TASKS if t in sources]
    share = share if tasks else 0.0
    copy = copy if "copy" in sources else 0.0
    weights = {n: (1 - share - copy) * t / total for n, t in corpus.items()}
    split = {"passkey": 1 - niah, "niah": niah} if len(tasks) == 2 else {t: 1.0 for t in tasks}
    weights.update({t: share * split[t] for t in tasks})
    if copy:
        weights["copy"] = copy
    return {n: w for n, w in weights.items() if w > 0}


# Training -----------------------------------------------------------------------------------------


def model_dict(s: Settings, max_len: int, info) -> dict:
    vocab = -(-info.vocab_size // 64) * 64
    return {"vocab_size": vocab, "bos_token_id": info.bos_id, "eos_token_id": [info.eos_id], "rms_norm_eps": 1e-5,
            "rope_theta": s.base_theta, "max_position_embeddings": max_len, "tie_word_embeddings": False,
            "dtype": "float32", "scan_layers": True, "remat": "none", "attention": "blockwise",
            "attention_block_size": 256, **s.model}


def make_recipe(name: str, s: Settings, out: Path, stages: list[dict], devices: int, share: float, copy: float = 0.0,
                packing: str = "continuous"):
    from lwm_jax.data.tokenize import load_tokenizer_info

    data_dir = out / "data"
    weights = data_weights(share, data_dir / f"prepared-{stages[0]['seq_len']}", copy, s.niah_share)
    info = load_tokenizer_info(data_dir / "sample" / "tokenizer")
    raw = {"name": name, "model": model_dict(s, s.l0, info), "mesh": {"dp": devices}, "seed": s.seed,
           "loss_chunk": 1024, "stages": stages}
    recipe = from_dict(RecipeConfig, raw)
    data = DataConfig(paths=(str(data_dir / "prepared-{seq_len}"),), weights=weights, packing=packing)
    return dataclasses.replace(recipe, data=data)


def stage(name: str, seq_len: int, steps: int, batch: int, lr: float, theta, init_from: str) -> dict:
    return {"name": name, "seq_len": seq_len, "steps": steps, "batch_size": batch, "rope_theta": str(theta),
            "init_from": init_from, "checkpoint_every": 0, "keep_checkpoints": 1,
            "optimizer": {"lr": lr, "warmup_steps": min(20, max(1, steps // 10)), "schedule": "cosine",
                          "min_lr_ratio": 0.1, "weight_decay": 0.1}}


def train_base(s: Settings, out: Path, devices: int) -> tuple[Path, list[dict]]:
    """The length curriculum, one single-stage recipe per length (each length's data holds its own
    set of tasks, so each gets its own mixture), each starting from the previous checkpoint."""
    from lwm_jax.train.runner import train

    summaries, ckpt, seen = [], None, []
    for i, (frac, steps, batch, lr, share, copy) in enumerate(s.curriculum):
        length = int(round(frac * s.l0))
        tag = f"{length}" + "r" * seen.count(length)  # a repeated length: base256, base256r, ...
        seen.append(length)
        st = stage(f"base{tag}", length, steps, batch, lr, s.base_theta, f"ckpt:{ckpt}" if ckpt else "scratch")
        say(f"base curriculum {i + 1}/{len(s.curriculum)}: {length} tokens x {steps} steps, "
            f"{share:.0%} retrieval, {copy:.0%} copy, theta {s.base_theta:,.0f}")
        # Packed by document: short copy documents must not see each other's runs.
        recipe = make_recipe(f"mini_base{tag}", s, out, [st], devices, share, copy, packing="document")
        summaries += train(recipe, out / f"base-{tag}")
        ckpt = out / f"base-{tag}" / "stages" / st["name"] / "checkpoints"
    return ckpt, summaries


def arm_stages(s: Settings, rule: str | None, base_ckpt: Path) -> list[dict]:
    """An arm's extension stages: the same lengths, steps, batches and optimizer for every arm."""
    stages = []
    from lwm_jax.model.rope import theta_for

    for i, (mult, train_mult, steps, batch, lr) in enumerate(s.extension):
        theta = s.base_theta if rule in (None, "yarn") else theta_for(rule, mult * s.l0, s.base_theta,
                                                                        s.model["head_dim"], s.l0)
        stages.append(stage(f"x{mult}", train_mult * s.l0, steps, batch, lr, theta,
                            f"ckpt:{base_ckpt}" if i == 0 else "previous"))
        if rule == "yarn":  # YaRN's factor is over the length the base was trained at
            stages[-1]["rope"] = {"type": "yarn", "factor": mult, "original_max_position_embeddings": s.l0}
    # Constant LR after a short warmup, as Gradient's stages (EasyContext: constant, no decay).
    for st in stages:
        st["optimizer"].update(schedule="constant", min_lr_ratio=0.0)
    return stages


def train_arm(s: Settings, out: Path, arm: str, rule: str | None, base_ckpt: Path, devices: int) -> list[dict]:
    from lwm_jax.train.runner import train

    stages = arm_stages(s, rule, base_ckpt)
    recipe = make_recipe(f"mini_{arm}", s, out, stages, devices, s.retrieval_share, s.extension_copy)
    say(f"arm {arm}: " + " -> ".join(f"{st['seq_len']} tokens x {st['steps']} steps" for st in stages))
    return train(recipe, out / f"arm-{arm}")


# Evaluation ---------------------------------------------------------------------------------------


def eval_lengths(s: Settings) -> list[int]:
    """L0 and every extension stage's target length: where each checkpoint is scored."""
    return [s.l0 * m for m in (1, *[m for m, *_ in s.extension])]


def evaluate(ckpt: Path, sample: Path, s: Settings, stacks, heatmaps: Path) -> dict:
    """Passkey and NIAH exact match (teacher-forced) at every eval length, `probes` per cell, with
    Wilson 95% intervals; the grids and heatmaps (titled with model, stage, theta and lengths) are
    written under `heatmaps` (the untempered ones under `heatmaps/untempered`). Past the trained
    length probes are scored with `s.temperature`. {"scores": {task: {len: p}}, "intervals": {task:
    {len: [lo, hi]}}, "untempered": {the same without the temperature}, ...}"""
    from lwm_jax.eval.niah import niah_eval, write_results
    from lwm_jax.eval.passkey import passkey_eval
    from lwm_jax.eval.reports import checkpoint_title
    from lwm_jax.eval.scoring import LengthTempered, setup_probes

    lengths = eval_lengths(s)
    p = setup_probes(str(ckpt), str(sample / "tokenizer"), max_length=max(lengths), lengths=lengths,
                     attention="blockwise")
    common = dict(lengths=lengths, depths=list(s.eval_depths), samples=s.eval_samples, seed=EVAL_SEED,
                  bos_id=p.info.bos_id)

    def score(logits_fn, folder: Path, note: str = "") -> dict:
        grids = {"passkey": passkey_eval(logits_fn, p.tokenizer, **common),
                 "niah": niah_eval(logits_fn, p.tokenizer, haystacks=stacks, **common)}
        for task, grid in grids.items():
            grid["title"] = checkpoint_title(task, str(ckpt), p.meta, lengths) + note
            write_results(grid, folder, task, grid["title"], heatmap=True)
        return {"scores": {t: {int(k): v for k, v in g["by_length"].items()} for t, g in grids.items()},
                "intervals": {t: {int(k): list(v["interval"]) for k, v in g["interval_by_length"].items()}
                              for t, g in grids.items()}}

    plain = score(p.logits_fn, heatmaps / "untempered" if s.temperature == "log-n" else heatmaps)
    result = {"probes": len(s.eval_depths) * s.eval_samples, "heatmaps": str(heatmaps), **plain}
    if s.temperature == "log-n":
        tempered = LengthTempered(p.logits_fn.model, lengths, max_length=max(lengths))
        result.update(score(tempered, heatmaps, ", log-n temperature past the trained length"), untempered=plain)
    return result


def position_loss(ckpt: Path, tokens, s: Settings) -> dict:
    """Mean next-token NLL on demo-corpus text in position buckets ending at each eval length."""
    from lwm_jax.eval.perplexity import nll_by_position
    from lwm_jax.model.opened import open_checkpoint

    model = open_checkpoint(str(ckpt), attention="blockwise").model()
    result = nll_by_position(model, tokens, [0, *eval_lengths(s)])
    return {int(b["end"]): b["mean_nll"] for b in result["buckets"]}


def claim(results: dict, s: Settings, raised: str = "scaling-law") -> dict:
    """The claim in numbers: the base at L0, and the raised-theta arm against the control, each
    extension stage scored at its own target length (null for a stage not run), with the run's
    temperature (and, under "untempered", without it); each task's "interval" holds the Wilson 95%
    intervals of the same cells."""

    def rows(pick) -> dict:
        out = {}
        for task in TASKS:
            base = pick(results["base"])
            row = {"base": {"1x": base["scores"][task][s.l0]}}
            interval = {"base": {"1x": list(base["intervals"][task][s.l0])}}
            for name, arm in (("raised", raised), ("control", "control")):
                stages = results["arms"].get(arm, {}).get("stages", {})
                cells = {f"{m}x": (pick(stages[f"x{m}"]), m * s.l0) if f"x{m}" in stages else None for m in (4, 16)}
                row[name] = {k: c and c[0]["scores"][task][c[1]] for k, c in cells.items()}
                interval[name] = {k: c and list(c[0]["intervals"][task][c[1]]) for k, c in cells.items()}
            out[task] = {**row, "interval": interval}
        return out

    out = {"L0": s.l0, "seed": s.seed, "probes_per_cell": len(s.eval_depths) * s.eval_samples,
           "raised_arm": raised, "temperature": s.temperature, **rows(lambda ev: ev)}
    if s.temperature == "log-n":
        out["untempered"] = rows(lambda ev: ev["untempered"])
    return out


def ahead(row: dict, at: str = "4x") -> bool:
    """The raised arm at least MIN_GAP above the control at `at`, their Wilson intervals apart."""
    raised, control = row["raised"][at], row["control"][at]
    if raised is None or control is None:
        return False
    apart = row["interval"]["raised"][at][0] > row["interval"]["control"][at][1]
    return round(raised - control, 6) >= MIN_GAP and apart


def claim_checks(c: dict) -> dict[str, bool | None]:
    """The claim's lines for one run's `claim` (None: not measured). Required: "base" (passkey and
    NIAH at L0 >= MIN_BASE), "raised" (passkey at 4x >= MIN_RAISED), "gap" (passkey at 4x `ahead`
    of the control). Reported: "niah_gap" and "niah_gap_untempered", NIAH the same way as "gap"."""
    pk, niah = c["passkey"], c["niah"]
    raised = pk["raised"]["4x"]
    return {"base": pk["base"]["1x"] >= MIN_BASE and niah["base"]["1x"] >= MIN_BASE,
            "raised": None if raised is None else raised >= MIN_RAISED,
            "gap": ahead(pk), "niah_gap": ahead(niah),
            "niah_gap_untempered": ahead(c["untempered"]["niah"]) if "untempered" in c else None}


REQUIRED = ("base", "raised", "gap")


STYLES = {"scaling-law": ("#0CD79F", "o"), "ntk": ("#EBB839", "s"), "control": ("#F0496E", "^"),
          "yarn": ("#3F6FD8", "D")}


def _errorbar(ax, lengths, scores, intervals, **style):
    """Accuracy by length with its Wilson 95% interval as error bars."""
    ys = [scores[n] for n in lengths]
    lo = [scores[n] - intervals[n][0] for n in lengths]
    hi = [intervals[n][1] - scores[n] for n in lengths]
    ax.errorbar(lengths, ys, yerr=[lo, hi], capsize=3, **style)


def plot(results: dict, s: Settings, path: Path) -> Path:
    """Passkey and NIAH accuracy by length (each arm after each stage, 95% error bars) and the
    demo-corpus loss by position."""
    plt = pyplot()
    lengths = eval_lengths(s)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, task in zip(axes, TASKS):
        base = results["base"]
        _errorbar(ax, lengths, base["scores"][task], base["intervals"][task], color="grey", linestyle=":",
                  marker="x", label=f"base (trained at {s.l0})")
        for arm in s.arms:
            color, marker = STYLES[arm]
            for k, (name, st) in enumerate(results["arms"][arm]["stages"].items()):
                _errorbar(ax, lengths, st["scores"][task], st["intervals"][task], color=color, marker=marker,
                          linestyle="-" if k == len(s.extension) - 1 else "--", alpha=1.0 if k else 0.6,
                          label=f"{arm} {name} (theta {st['rope_theta']:,.0f}, trained at {st['seq_len']:,})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [short_length(n) for n in lengths])
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(f"{task} exact match ({results['probes_per_cell']} probes per point, 95% Wilson)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=6, loc="lower left")
    ax = axes[2]
    for name, loss in results["position_loss"].items():
        arm = name.split()[0]
        color, marker = STYLES.get(arm, ("grey", "x"))
        ax.plot(lengths, [loss[n] for n in lengths], color=color, marker=marker,
                linestyle=":" if name == "base" else "-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"<{short_length(n)}" for n in lengths])
    ax.set_xlabel("position bucket (tokens)")
    ax.set_ylabel("mean NLL (nats)")
    ax.set_title(f"demo-corpus loss by position ({results['position_loss_sequences']} x {lengths[-1]:,} tokens)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"Miniature context extension: base at {s.l0} tokens, theta {s.base_theta:,.0f}, "
                 f"head_dim {s.model['head_dim']}; each stage trains at a quarter of the length it targets"
                 + ("; log-n attention temperature past the trained length" if s.temperature == "log-n" else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(results: dict, s: Settings, untempered: bool = False) -> list[str]:
    """One row per checkpoint: theta, trained length, then exact match [95% interval] per task and
    length (`untempered`: the scores without the temperature)."""
    lengths = eval_lengths(s)
    head = "".join(f"{f'{t}@{short_length(n)}':>15}" for t in ("pk", "niah") for n in lengths)
    lines = [f"{'model':<18}{'theta':>12}{'trained':>8}{head}"]

    def row(name: str, theta: float, trained: int, ev: dict) -> str:
        ev = ev["untempered"] if untempered else ev
        cells = ""
        for task in TASKS:
            for n in lengths:
                lo, hi = ev["intervals"][task][n]
                cells += f"{ev['scores'][task][n]:>6.0%} [{100 * lo:>2.0f}-{100 * hi:>3.0f}]"
        return f"{name:<18}{theta:>12,.0f}{trained:>8,}{cells}"

    lines.append(row("base", s.base_theta, s.l0, results["base"]))
    for arm in s.arms:
        for name, st in results["arms"][arm]["stages"].items():
            lines.append(row(f"{arm} {name}", st["rope_theta"], st["seq_len"], st))
    return lines


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def settings_json(s: Settings) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(s)))


def check_reuse(s: Settings, out: Path) -> None:
    """Exits when OUT holds a run made with other settings: its data and stages would be reused."""
    path = out / "settings.json"
    if not path.is_file():
        return
    old, new = json.loads(path.read_text()), settings_json(s)
    changed = sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k))
    if changed:
        sys.exit(f"mini_extension: {out} holds a run with other settings ({', '.join(changed)}); "
                 "give another --out, or --fresh to start over")


def run(s: Settings, out: Path, devices: int = 1) -> dict:
    """The whole miniature in OUT (data, base, arms, evaluation, figure, claim.json); its results."""
    started, cpu = time.time(), cpu_seconds()
    check_reuse(s, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(dataclasses.asdict(s), indent=1) + "\n")
    timings = {}

    tick = time.time()
    sample, _ = build_data(s, out)
    timings["data_s"] = time.time() - tick

    tick = time.time()
    base_ckpt, base_summaries = train_base(s, out, devices)
    timings["base_s"] = time.time() - tick

    from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info
    from lwm_jax.eval.niah import load_haystacks

    tokenizer = get_tokenizer(load_tokenizer_info(sample / "tokenizer").tokenizer_file)
    lengths = eval_lengths(s)
    stacks = load_haystacks(None, tokenizer, max(lengths))
    tick = time.time()
    say(f"evaluating base at {lengths}")
    results = {"settings": dataclasses.asdict(s), "lengths": lengths,
               "probes_per_cell": len(s.eval_depths) * s.eval_samples,
               "base": {"summaries": base_summaries, **evaluate(base_ckpt, sample, s, stacks, out / "eval" / "base")},
               "arms": {}}
    timings["eval_s"] = time.time() - tick
    timings["extension_s"] = 0.0
    for arm in s.arms:
        tick = time.time()
        summaries = train_arm(s, out, arm, ARMS[arm], base_ckpt, devices)
        timings["extension_s"] += time.time() - tick
        tick = time.time()
        stages = {}
        for summary in summaries:
            name = summary["stage"]
            ckpt = out / f"arm-{arm}" / "stages" / name / "checkpoints"
            say(f"evaluating {arm} {name}")
            stages[name] = {"rope_theta": summary["rope_theta"], "seq_len": summary["seq_len"],
                            "final_loss": summary["final_loss"],
                            **evaluate(ckpt, sample, s, stacks, out / "eval" / f"{arm}-{name}")}
        timings["eval_s"] += time.time() - tick
        results["arms"][arm] = {"stages": stages}
    tick = time.time()
    from lwm_jax.eval.perplexity import load_eval_data

    say(f"loss by position on {s.position_loss_sequences} demo-corpus sequences of {lengths[-1]:,} tokens")
    tokens = load_eval_data([str(out / "data" / "corpus.jsonl")], lengths[-1], s.position_loss_sequences,
                            s.vocab_size, str(sample / "tokenizer"))
    last = f"x{s.extension[-1][0]}"
    results["position_loss_sequences"] = s.position_loss_sequences
    results["position_loss"] = {"base": position_loss(base_ckpt, tokens, s)}
    for arm in s.arms:
        results["position_loss"][f"{arm} {last}"] = position_loss(
            out / f"arm-{arm}" / "stages" / last / "checkpoints", tokens, s)
    timings["eval_s"] += time.time() - tick
    timings["total_s"] = time.time() - started
    timings["cpu_s"] = cpu_seconds() - cpu
    results["timings"] = timings
    results["claim"] = claim(results, s)
    (out / "claim.json").write_text(json.dumps(results["claim"], indent=1) + "\n")
    results["png"] = str(plot(results, s, out / "mini_extension.png"))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def report(results: dict, s: Settings, out: Path) -> None:
    """The tables on stdout."""
    timings = results["timings"]
    print(f"Miniature context extension: base trained at {s.l0} tokens (theta {s.base_theta:,.0f}); "
          + "; ".join(f"stage x{m} trains at {t * s.l0:,} tokens" for m, t, *_ in s.extension))
    scoring = ("log-n attention temperature past the trained length" if s.temperature == "log-n"
               else "no temperature")
    print(f"passkey (pk) and NIAH exact match (teacher-forced), {results['probes_per_cell']} probes per cell, "
          f"[95% Wilson interval]; {scoring}")
    for line in table(results, s):
        print(line)
    if s.temperature == "log-n":
        print("the same without the temperature")
        for line in table(results, s, untempered=True):
            print(line)
    lengths = results["lengths"]
    print(f"mean NLL on demo-corpus text by position bucket ({results['position_loss_sequences']} sequences of "
          f"{lengths[-1]:,} tokens)")
    edges = [0, *lengths]
    print(f"{'model':<24}" + "".join(f"{f'{a}-{b}':>14}" for a, b in zip(edges[:-1], edges[1:])))
    for name, loss in results["position_loss"].items():
        print(f"{name:<24}" + "".join(f"{loss[n]:>14.3f}" for n in lengths))
    print(f"time: data {timings['data_s']:.0f} s, base {timings['base_s']:.0f} s, extension "
          f"{timings['extension_s']:.0f} s, eval {timings['eval_s']:.0f} s, total {timings['total_s']:.0f} s")
    print(f"figure: {results['png']}; heatmaps: {out / 'eval'}; results: {out / 'results.json'}; "
          f"claim: {out / 'claim.json'}")


# Seeds -------------------------------------------------------------------------------------------


def finished(s: Settings, out: Path) -> dict | None:
    """OUT's results.json when it holds a finished run with these settings."""
    path = out / "results.json"
    if path.is_file():
        results = json.loads(path.read_text())
        if results.get("settings") == settings_json(s):
            return results
    return None


def sweep(s: Settings, out: Path, seeds: list[int], devices: int = 1) -> dict:
    """The run once per seed, each in OUT/seed-K (a finished one is read back, not run again); the
    claim, checks and times of every seed, also written to OUT/sweep.json."""
    started, cpu = time.time(), cpu_seconds()
    rows = []
    for seed in seeds:
        one = dataclasses.replace(s, seed=seed)
        folder = out / f"seed-{seed}"
        say(f"seed {seed} in {folder}")
        results = finished(one, folder) or run(one, folder, devices)
        rows.append({"seed": seed, "out": str(folder), "claim": results["claim"], "timings": results["timings"],
                     "checks": claim_checks(results["claim"])})
    summary = {"settings": settings_json(s), "seeds": rows, "wall_s": time.time() - started,
               "cpu_s": cpu_seconds() - cpu,
               "passed": all(r["checks"][k] for r in rows for k in REQUIRED)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _pct(p: float | None, interval=None) -> str:
    if p is None:
        return "-"
    return f"{p:.0%}" + (f" [{100 * interval[0]:.0f}-{100 * interval[1]:.0f}]" if interval else "")


def seed_table(summary: dict) -> list[str]:
    """One line per seed: the base at L0, then passkey and NIAH at 4x for the raised arm and the
    control with their intervals (NIAH without the temperature in parentheses), the time."""
    first = summary["seeds"][0]["claim"]
    l0, four = first["L0"], 4 * first["L0"]
    head = [f"base pk@{l0}", f"base niah@{l0}", f"raised pk@{four}", f"control pk@{four}",
            f"raised niah@{four}", f"control niah@{four}"]
    lines = [f"{'seed':>4}{head[0]:>13}{head[1]:>15}" + "".join(f"{h:>20}" for h in head[2:]) + f"{'time':>8}"]
    for row in summary["seeds"]:
        c = row["claim"]
        cells = [_pct(c["passkey"]["base"]["1x"]), _pct(c["niah"]["base"]["1x"])]
        for task in TASKS:
            for arm in ("raised", "control"):
                cell = _pct(c[task][arm]["4x"], c[task]["interval"][arm]["4x"])
                if task == "niah" and "untempered" in c:
                    cell += f" ({_pct(c['untempered'][task][arm]['4x'])})"
                cells.append(cell)
        minutes = row["timings"]["total_s"] / 60
        lines.append(f"{row['seed']:>4}{cells[0]:>13}{cells[1]:>15}" + "".join(f"{x:>20}" for x in cells[2:])
                     + f"{minutes:>6.1f} m")
    return lines


def spread(summary: dict) -> list[str]:
    """Mean, min and max over the seeds of each cell of the claim."""
    lines = []
    first = summary["seeds"][0]["claim"]
    cells = [("passkey", "base", "1x"), ("niah", "base", "1x"), ("passkey", "raised", "4x"),
             ("passkey", "control", "4x"), ("niah", "raised", "4x"), ("niah", "control", "4x")]
    for task, arm, at in cells:
        values = [r["claim"][task][arm][at] for r in summary["seeds"]]
        if None in values:
            continue
        n = first["L0"] * int(at[:-1])
        lines.append(f"{task} {arm} at {n}: mean {sum(values) / len(values):.0%}, "
                     f"min {min(values):.0%}, max {max(values):.0%}")
    return lines


CHECK_LINES = {
    "base": "base >= {base:.0%} passkey and >= {base:.0%} NIAH at {l0}",
    "raised": "raised theta >= {raised:.0%} passkey at {four}",
    "gap": "raised theta >= control + {gap:.0f} points on passkey at {four}, Wilson intervals apart",
    "niah_gap": "(reported) the same on NIAH at {four}, log-n temperature",
    "niah_gap_untempered": "(reported) the same on NIAH at {four}, no temperature",
}


def check_lines(l0: int) -> dict[str, str]:
    """What each of `claim_checks` checks, in words, for this L0."""
    fields = dict(base=MIN_BASE, raised=MIN_RAISED, gap=100 * MIN_GAP, l0=l0, four=4 * l0)
    return {key: text.format(**fields) for key, text in CHECK_LINES.items()}


def sweep_report(summary: dict) -> None:
    """The per-seed table, the spread and each check's pass/fail on stdout."""
    rows = summary["seeds"]
    l0 = rows[0]["claim"]["L0"]
    print(f"The claim per seed ({rows[0]['claim']['probes_per_cell']} probes per cell, exact match [95% Wilson "
          f"interval]; past the trained length with the log-n temperature, NIAH without it in parentheses)")
    for line in seed_table(summary):
        print(line)
    print("spread over the seeds")
    for line in spread(summary):
        print(f"  {line}")
    for key, text in check_lines(l0).items():
        marks = [r["checks"][key] for r in rows]
        if None in marks:
            continue
        verdict = ("PASS" if all(marks) else "FAIL") if key in REQUIRED else "    "
        failed = [str(r["seed"]) for r, m in zip(rows, marks) if not m]
        print(f"{verdict}  {text}: {sum(marks)}/{len(marks)} seeds"
              + (f" (not seed {', '.join(failed)})" if failed else ""))
    wall = [r["timings"]["total_s"] for r in rows]
    print(f"time: one seed {min(wall):.0f}-{max(wall):.0f} s; the sweep {summary['wall_s']:.0f} s wall, "
          f"{summary['cpu_s']:.0f} s CPU (user + sys)")


def configure_jax(devices: int) -> None:
    """`devices` simulated CPU devices, whatever XLA_FLAGS the caller inherited (pytest sets 8)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    import jax

    jax.config.update("jax_num_cpu_devices", devices)


def main(argv=None) -> int:
    args = parse_args(argv)
    s = settings_from(args)
    configure_jax(args.devices)
    out = Path(args.out).resolve()
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    if args.seeds:
        summary = sweep(s, out, list(range(s.seed, s.seed + args.seeds)), args.devices)
        sweep_report(summary)
        print(f"per seed: {out}/seed-K; the table: {out / 'sweep.json'}")
        if args.json:
            print(json.dumps(summary))
        return 0 if summary["passed"] else 1
    results = run(s, out, args.devices)
    report(results, s, out)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
