"""A miniature reproduction of Gradient's claim: raising RoPE theta and training briefly at the longer
length gives retrieval at that length. A small Llama-3-shaped model (head_dim 64) learns passkey and
needle-in-a-haystack retrieval at a short length L0 (a length curriculum up to L0: copy documents
first, then retrieval documents mixed with copy documents and the demo corpus); then four arms
extend it to 4x and 16x L0 in two stages with the same steps and data: theta by the scaling-law
rule, by the NTK rule, unchanged (the control), and unchanged with YaRN scaling instead (factor
4 and 16 over the original L0, transformers' `yarn` with its attention factor). Passkey and NIAH
accuracy per arm and length are printed as a table and drawn as a PNG.

Everything goes through the project's own code: `lwm_jax.data.synthetic` for the copy and retrieval
documents, `lwm_jax.data.prepare` for the data, `lwm_jax.train.runner.train` for every stage (recipes
built as dicts), and the passkey / NIAH evaluators of `lwm_jax.eval`. Not part of `make demo`; the
default run took 47 minutes on 2 CPU cores, `--quick` takes 3-6 minutes (a smoke check, too short to
learn anything). Finished data and stages in OUT are reused when the script is run again (`--fresh`
starts over).

    python scripts/mini_extension.py [--out runs/mini_extension] [--quick] [--json]
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
# (name, stage rope_theta rule); the yarn arm keeps theta and scales RoPE with YaRN instead.
ARMS = (("scaling-law", "scaling-law"), ("ntk", "ntk"), ("control", None), ("yarn", "yarn"))
TASKS = RETRIEVAL_TASKS  # ("passkey", "niah")
EVAL_SEED = 12345  # probes scored are built from other seeds than the training documents


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run (the default, or `--quick`)."""

    l0: int = 256
    base_theta: float = 10_000.0
    model: dict = dataclasses.field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=384, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=64))
    # Base curriculum: (seq_len as a fraction of L0, steps, batch, lr, retrieval share, copy share);
    # the last entries are at L0, the very last one retrieval-heavy (the skill must be solid before
    # extending). Copy documents (runs of random digit tokens, repeated) teach the model to copy.
    curriculum: tuple = ((0.5, 400, 16, 3e-3, 0.0, 1.0), (0.5, 600, 16, 3e-3, 0.5, 0.4),
                         (1.0, 800, 8, 2e-3, 0.7, 0.2), (1.0, 1000, 8, 2e-3, 0.8, 0.1))
    # Extension stages: (multiple of L0, steps, batch, lr), the same for every arm.
    extension: tuple = ((4, 150, 2, 1e-3), (16, 40, 1, 5e-4))
    retrieval_share: float = 0.5  # share of extension sequences that are passkey / NIAH documents
    retrieval_docs: int = 1500  # documents generated per task and length (cap; epochs repeat them)
    copy_docs: int = 40_000  # copy documents per base length that uses them (~20 tokens each)
    eval_depths: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
    eval_samples: int = 2
    corpus_chars: int = 3_000_000  # demo-corpus text used per source (keeps `prepare` short)


QUICK = Settings(
    l0=128, model=dict(hidden_size=64, intermediate_size=192, num_layers=1, num_heads=2, num_kv_heads=1,
                       head_dim=32),
    curriculum=((1.0, 6, 8, 3e-3, 0.5, 0.2),), extension=((4, 2, 2, 1e-3), (16, 2, 1, 5e-4)),
    retrieval_docs=16, eval_depths=(0.5,), eval_samples=1, corpus_chars=200_000)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Results: OUT/results.json, OUT/mini_extension.png; the table on stdout.")
    p.add_argument("--out", default=str(ROOT / "runs" / "mini_extension"),
                   help="output folder (default runs/mini_extension, git-ignored)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run of a few minutes (learns nothing)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    p.add_argument("--devices", type=int, default=1,
                   help="simulated CPU devices, mesh dp=N (default 1: on 2 cores 8 devices were no faster, "
                        "2.0 vs 2.1 s per 256x16 step, and dp=8 would need batches divisible by 8)")
    p.add_argument("--fresh", action="store_true", help="delete OUT first (default: reuse finished data and stages)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a Settings field (YAML value), e.g. --set l0=128 --set 'extension=[[4,60,4,1e-3]]'")
    return p.parse_args(argv)


def settings_from(args) -> Settings:
    s = QUICK if args.quick else Settings()
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or key not in {f.name for f in dataclasses.fields(Settings)}:
            fields = ", ".join(f.name for f in dataclasses.fields(Settings))
            sys.exit(f"mini_extension: bad --set {item!r} (fields: {fields})")
        value = yaml.safe_load(raw)
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        s = dataclasses.replace(s, **{key: value})
    return s


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Data ---------------------------------------------------------------------------------------------


def stage_lengths(s: Settings) -> list[int]:
    base = [int(round(f * s.l0)) for f, *_ in s.curriculum]
    return sorted(set(base + [m * s.l0 for m, *_ in s.extension]))


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
        build_sample(sample)
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
        if sentences is None:
            sentences = split_sentences(demo_haystack(NIAH_TRAIN_SKIP * 40 + 20 * longest))
        here = [c for c in s.curriculum if int(round(c[0] * s.l0)) == length]
        sequences = sum(st * b * r for _, st, b, _, r, _ in here)
        sequences += sum(st * b * s.retrieval_share for m, st, b, _ in s.extension if m * s.l0 == length)
        count = min(s.retrieval_docs, 16 + int(sequences / len(TASKS)))
        tick = time.time()
        docs = []
        for task in TASKS:
            path = out / "data" / f"retrieval-{length}" / f"{task}.array_record"
            if retrieval_documents(tokenizer, task, length, count, path, bos_id=info.bos_id, seed=1,
                                   sentences=sentences):
                docs.append(f"{task}={path}")
        names = " and ".join(d.split("=")[0] for d in docs) or "no"
        message = f"{length}-token {names} documents: {count} each"
        if any(c[5] for c in here):
            path = out / "data" / f"retrieval-{length}" / "copy.array_record"
            docs.append(f"copy={path}")
            copy_documents(tokenizer, s.copy_docs, path, seed=length)
            message += f", {s.copy_docs:,} copy documents"
        say(f"{message} ({time.time() - tick:.0f} s); preparing")
        config = PrepareConfig(seq_len=length, min_doc_tokens=0, short_keep_prob=1.0)
        prepare([str(corpus), *docs], sample / "tokenizer", target, config, overwrite=True)
    return sample, prepared


def data_weights(share: float, prepared: Path, copy: float = 0.0) -> dict[str, float]:
    """Mixture weights: `share` split evenly over the tasks prepared at that length, `copy` to the
    copy documents, the rest over the corpus sources by their token counts."""
    sources = manifest.load_manifest(prepared)["sources"]
    corpus = {n: v["kept_tokens"] for n, v in sources.items() if n not in (*TASKS, "copy")}
    total = sum(corpus.values())
    tasks = [t for t in TASKS if t in sources]
    share = share if tasks else 0.0
    copy = copy if "copy" in sources else 0.0
    weights = {n: (1 - share - copy) * t / total for n, t in corpus.items()}
    weights.update({t: share / len(tasks) for t in tasks})
    if copy:
        weights["copy"] = copy
    return {n: w for n, w in weights.items() if w > 0}


# Training -----------------------------------------------------------------------------------------


def model_dict(s: Settings, max_len: int) -> dict:
    return {"vocab_size": 4096, "bos_token_id": 4091, "eos_token_id": [4092, 4095], "rms_norm_eps": 1e-5,
            "rope_theta": s.base_theta, "max_position_embeddings": max_len, "tie_word_embeddings": False,
            "dtype": "float32", "scan_layers": True, "remat": "none", "attention": "blockwise",
            "attention_block_size": 256, **s.model}


def make_recipe(name: str, s: Settings, out: Path, stages: list[dict], devices: int, share: float, copy: float = 0.0,
                packing: str = "continuous"):
    data_dir = out / "data"
    weights = data_weights(share, data_dir / f"prepared-{stages[0]['seq_len']}", copy)
    raw = {"name": name, "model": model_dict(s, s.l0), "mesh": {"dp": devices}, "seed": 0, "loss_chunk": 1024,
           "stages": stages}
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
    for i, (mult, steps, batch, lr) in enumerate(s.extension):
        theta = s.base_theta if rule in (None, "yarn") else rule
        stages.append(stage(f"x{mult}", mult * s.l0, steps, batch, lr, theta,
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
    recipe = make_recipe(f"mini_{arm}", s, out, stages, devices, s.retrieval_share)
    say(f"arm {arm}: " + " -> ".join(f"{st['seq_len']} tokens x {st['steps']} steps" for st in stages))
    return train(recipe, out / f"arm-{arm}")


# Evaluation ---------------------------------------------------------------------------------------


def evaluate(ckpt: Path, sample: Path, lengths: list[int], s: Settings, stacks) -> dict:
    """Passkey and NIAH exact match (teacher-forced) per length: {"passkey": {len: score}, ...}."""
    from lwm_jax.eval.niah import niah_eval
    from lwm_jax.eval.passkey import passkey_eval
    from lwm_jax.eval.scoring import setup_probes

    p = setup_probes(str(ckpt), str(sample / "tokenizer"), max_length=max(lengths), lengths=lengths,
                     attention="blockwise")
    common = dict(lengths=lengths, depths=list(s.eval_depths), samples=s.eval_samples, seed=EVAL_SEED,
                  bos_id=p.info.bos_id)
    passkey = passkey_eval(p.logits_fn, p.tokenizer, **common)
    niah = niah_eval(p.logits_fn, p.tokenizer, haystacks=stacks, **common)
    return {"passkey": {int(k): v for k, v in passkey["by_length"].items()},
            "niah": {int(k): v for k, v in niah["by_length"].items()}}


def position_loss(ckpt: Path, tokens, s: Settings) -> dict:
    """Mean next-token NLL on demo-corpus text in position buckets [0, L0), [L0, 4 L0), [4 L0, 16 L0)."""
    from lwm_jax.eval.perplexity import nll_by_position
    from lwm_jax.model.store import load_model

    model, _ = load_model(str(ckpt), attention="blockwise")
    edges = [0, *[m * s.l0 for m in (1, *[m for m, *_ in s.extension])]]
    result = nll_by_position(model, tokens, edges)
    return {int(b["end"]): b["mean_nll"] for b in result["buckets"]}


def plot(results: dict, s: Settings, path: Path) -> Path:
    plt = pyplot()
    lengths = [s.l0 * m for m in (1, *[m for m, *_ in s.extension])]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    styles = {"scaling-law": ("#0CD79F", "o"), "ntk": ("#EBB839", "s"), "control": ("#F0496E", "^"),
              "yarn": ("#3F6FD8", "D")}
    for ax, task in zip(axes, TASKS):
        base = results["base"]["scores"][task]
        ax.plot(lengths, [base[n] for n in lengths], color="grey", linestyle=":", marker="x",
                label=f"base (trained at {s.l0})")
        for arm, _ in ARMS:
            color, marker = styles[arm]
            final = results["arms"][arm]["final"][task]
            ax.plot(lengths, [final[n] for n in lengths], color=color, marker=marker,
                    label=f"{arm} (after {lengths[-1]:,})")
            staged = [results["arms"][arm]["stages"][f"x{m}"]["scores"][task][m * s.l0] for m, *_ in s.extension]
            ax.plot(lengths[1:], staged, color=color, linestyle="--", marker=marker, alpha=0.5, markerfacecolor="none",
                    label=f"{arm} (each stage at its length)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [short_length(n) for n in lengths])
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(f"{task} exact match")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=7, loc="center right")
    ax = axes[2]
    names = [("base", "grey", "x", ":")] + [(f"{arm} x{s.extension[-1][0]}", styles[arm][0], styles[arm][1], "-")
                                            for arm, _ in ARMS]
    for name, color, marker, line in names:
        loss = results["position_loss"][name]
        ax.plot(lengths, [loss[n] for n in lengths], color=color, marker=marker, linestyle=line, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"<{short_length(n)}" for n in lengths])
    ax.set_xlabel("position bucket (tokens)")
    ax.set_ylabel("mean NLL (nats)")
    ax.set_title(f"demo-corpus loss by position ({results['position_loss_sequences']} x {lengths[-1]:,} tokens)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"Miniature context extension: base at {s.l0} tokens, theta {s.base_theta:,.0f}, "
                 f"head_dim {s.model['head_dim']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(results: dict, s: Settings) -> list[str]:
    lengths = [s.l0 * m for m in (1, *[m for m, *_ in s.extension])]
    head = "".join(f"{'pk@' + str(n):>9}" for n in lengths) + "".join(f"{'niah@' + str(n):>11}" for n in lengths)
    lines = [f"{'model':<24}{'theta':>14}{head}"]

    def row(name: str, theta: float, scores: dict) -> str:
        cells = "".join(f"{scores['passkey'][n]:>9.0%}" for n in lengths)
        cells += "".join(f"{scores['niah'][n]:>11.0%}" for n in lengths)
        return f"{name:<24}{theta:>14,.0f}{cells}"

    lines.append(row("base", s.base_theta, results["base"]["scores"]))
    for arm, _ in ARMS:
        for name, st in results["arms"][arm]["stages"].items():
            lines.append(row(f"{arm} {name}", st["rope_theta"], st["scores"]))
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    s = settings_from(args)
    started = time.time()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # --devices decides, not an inherited --xla_force_host_platform_device_count (pytest sets 8).
    os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    out = Path(args.out).resolve()
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(dataclasses.asdict(s), indent=1) + "\n")
    timings = {}

    tick = time.time()
    sample, _ = build_data(s, out)
    timings["data_s"] = time.time() - tick

    tick = time.time()
    base_ckpt, base_summaries = train_base(s, out, args.devices)
    timings["base_s"] = time.time() - tick

    from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info
    from lwm_jax.eval.niah import load_haystacks

    tokenizer = get_tokenizer(load_tokenizer_info(sample / "tokenizer").tokenizer_file)
    lengths = [s.l0 * m for m in (1, *[m for m, *_ in s.extension])]
    stacks = load_haystacks(None, tokenizer, max(lengths))
    tick = time.time()
    say(f"evaluating base at {lengths}")
    results = {"settings": dataclasses.asdict(s), "lengths": lengths,
               "base": {"summaries": base_summaries, "scores": evaluate(base_ckpt, sample, lengths, s, stacks)},
               "arms": {}}
    timings["eval_s"] = time.time() - tick
    timings["extension_s"] = 0.0
    for arm, rule in ARMS:
        tick = time.time()
        summaries = train_arm(s, out, arm, rule, base_ckpt, args.devices)
        timings["extension_s"] += time.time() - tick
        tick = time.time()
        stages = {}
        for summary in summaries:
            ckpt = out / f"arm-{arm}" / "stages" / summary["stage"] / "checkpoints"
            say(f"evaluating {arm} {summary['stage']}")
            stages[summary["stage"]] = {"rope_theta": summary["rope_theta"], "seq_len": summary["seq_len"],
                                        "final_loss": summary["final_loss"],
                                        "scores": evaluate(ckpt, sample, lengths, s, stacks)}
        timings["eval_s"] += time.time() - tick
        results["arms"][arm] = {"stages": stages, "final": stages[summaries[-1]["stage"]]["scores"]}
    tick = time.time()
    from lwm_jax.eval.perplexity import load_eval_data

    sequences = 4 if args.quick else 8
    say(f"loss by position on {sequences} demo-corpus sequences of {lengths[-1]:,} tokens")
    tokens = load_eval_data([str(out / "data" / "corpus.jsonl")], lengths[-1], sequences, 4096,
                            str(sample / "tokenizer"))
    last = f"x{s.extension[-1][0]}"
    results["position_loss_sequences"] = sequences
    results["position_loss"] = {"base": position_loss(base_ckpt, tokens, s)}
    for arm, _ in ARMS:
        results["position_loss"][f"{arm} {last}"] = position_loss(
            out / f"arm-{arm}" / "stages" / last / "checkpoints", tokens, s)
    timings["eval_s"] += time.time() - tick
    timings["total_s"] = time.time() - started
    results["timings"] = timings
    results["png"] = str(plot(results, s, out / "mini_extension.png"))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    print(f"Miniature context extension: base trained at {s.l0} tokens (theta {s.base_theta:,.0f}), "
          f"extended to {', '.join(str(m * s.l0) for m, *_ in s.extension)} tokens per arm")
    print("passkey (pk) and NIAH exact match (teacher-forced), each checkpoint at each length")
    for line in table(results, s):
        print(line)
    print(f"mean NLL on demo-corpus text by position bucket ({results['position_loss_sequences']} sequences of "
          f"{lengths[-1]:,} tokens)")
    edges = [0, *lengths]
    print(f"{'model':<24}" + "".join(f"{f'{a}-{b}':>14}" for a, b in zip(edges[:-1], edges[1:])))
    for name, loss in results["position_loss"].items():
        print(f"{name:<24}" + "".join(f"{loss[n]:>14.3f}" for n in lengths))
    print(f"time: data {timings['data_s']:.0f} s, base {timings['base_s']:.0f} s, extension "
          f"{timings['extension_s']:.0f} s, eval {timings['eval_s']:.0f} s, total {timings['total_s']:.0f} s")
    print(f"figure: {results['png']}; results: {out / 'results.json'}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
