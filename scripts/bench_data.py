"""Data-pipeline throughput on this machine: tokens/s of raw `jsonl.zst` through `prepare`
(tokenizing) against `tokenizers`' batch encoder called directly on the same text, and tokens/s
read from prepared shards at seq_len 65,536 through the training pipeline.

Direct and prepare runs alternate in one process; the ratio is the median over adjacent pairs and
each rate the median of its side, so load from other processes on a shared machine hits both sides
alike. Human table first; `--json` adds one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREPARED_TARGET = 20e6  # tokens/s per host the issue asks of prepared shards
RAW_TARGET_RATIO = 0.8  # raw tokenization against the direct batch encoder


def _default_tokenizer() -> Path | None:
    path = Path(os.environ.get("LWM_LLAMA3_TOKENIZER", ROOT.parent / "shared" / "llama3-tokenizer"))
    return path if (path / "tokenizer.json").is_file() else None


def _read_texts(files: list[Path]) -> list[str]:
    import zstandard

    texts = []
    for f in files:
        with open(f, "rb") as raw:
            reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
            texts.extend(json.loads(line)["text"] for line in reader if line.strip())
    return texts


def bench_direct(tokenizer, texts: list[str]) -> tuple[int, float]:
    """Tokens and seconds of the batch encoder on in-memory text, batched as prepare batches it."""
    from lwm_jax.data.tokenize import TEXT_BATCH_CHARS

    start = time.perf_counter()
    tokens, batch, chars = 0, [], 0
    for text in texts + [None]:
        if text is not None:
            batch.append(text)
            chars += len(text)
        if batch and (text is None or chars >= TEXT_BATCH_CHARS):
            tokens += sum(len(e.ids) for e in tokenizer.encode_batch_fast(batch, add_special_tokens=False))
            batch, chars = [], 0
    return tokens, time.perf_counter() - start


def bench_raw(files: list[Path], tokenizer_dir: Path, out: Path, workers: int) -> tuple[int, float]:
    """Content tokens and wall seconds of `prepare` (read, parse, tokenize, pack, write)."""
    from lwm_jax.config import PrepareConfig
    from lwm_jax.data.prepare import prepare

    config = PrepareConfig(seq_len=65_536, short_keep_prob=1.0, workers=workers)
    start = time.perf_counter()
    manifest = prepare([str(f) for f in files], tokenizer_dir, out, config, overwrite=True)
    seconds = time.perf_counter() - start
    return sum(s["content_tokens"] for s in manifest["sources"].values()), seconds


def bench_prepared(prepared: Path, batches: int, batch_size: int) -> tuple[int, float]:
    """Tokens and seconds of reading `batches` global batches through the training iterator."""
    from lwm_jax.config import DataConfig
    from lwm_jax.data.pipeline import build_iterator

    it = build_iterator(DataConfig(paths=(str(prepared),)), seq_len=65_536, global_batch_size=batch_size, seed=0,
                        process_index=0, process_count=1)
    next(it)  # open the shards, start the read threads
    start = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += next(it)["tokens"].size
    seconds = time.perf_counter() - start
    it.close()
    return tokens, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="folder of *.jsonl.zst (default: build the demo corpus)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the shared Llama-3 one, "
                                                       "else the demo tokenizer)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating (direct, prepare) pairs")
    parser.add_argument("--workers", type=int, default=0, help="prepare's grain worker processes")
    parser.add_argument("--batches", type=int, default=64, help="batches of 8 x 65,537 tokens read")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)

    from lwm_jax.data.sample import build_sample
    from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        corpus = args.corpus
        sample_tokenizer = None
        if corpus is None:
            build_sample(tmp / "sample")
            corpus = tmp / "sample" / "corpus"
            sample_tokenizer = tmp / "sample" / "tokenizer"
        tokenizer_dir = args.tokenizer or _default_tokenizer() or sample_tokenizer
        if tokenizer_dir is None:
            parser.error("--tokenizer is required with --corpus when the Llama-3 tokenizer is not found")
        files = sorted(corpus.glob("*.jsonl.zst"))
        if not files:
            parser.error(f"{corpus} holds no *.jsonl.zst files")
        texts = _read_texts(files)
        info = load_tokenizer_info(tokenizer_dir)
        tokenizer = get_tokenizer(info.tokenizer_file)

        direct, raw, ratios = [], [], []
        for _ in range(args.repeats):
            tok_d, sec_d = bench_direct(tokenizer, texts)
            direct.append(tok_d / sec_d)
            tok_r, sec_r = bench_raw(files, tokenizer_dir, tmp / "prepared", args.workers)
            raw.append(tok_r / sec_r)
            ratios.append(raw[-1] / direct[-1])
            if tok_r != tok_d:
                raise SystemExit(f"token counts differ: prepare {tok_r}, direct {tok_d}")
        tok_p, sec_p = bench_prepared(tmp / "prepared", args.batches, 8)

    result = {
        "prepared_tokens_per_s": tok_p / sec_p,
        "raw_tokens_per_s": statistics.median(raw),
        "direct_tokenizer_tokens_per_s": statistics.median(direct),
        "raw_over_direct": statistics.median(ratios),
        "raw_over_direct_pairs": [round(r, 3) for r in ratios],
        "prepared_over_target": tok_p / sec_p / PREPARED_TARGET,
        "tokens": tok_d, "chars": sum(map(len, texts)), "documents": len(texts),
        "tokenizer": str(tokenizer_dir), "workers": args.workers, "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
    }
    rows = [
        ("raw jsonl.zst -> prepare (tokenizing)", f"{result['raw_tokens_per_s']:,.0f}",
         f"{result['raw_over_direct']:.2f}x direct (need >= {RAW_TARGET_RATIO})"),
        ("tokenizers batch encoder, direct", f"{result['direct_tokenizer_tokens_per_s']:,.0f}", "1.00x"),
        ("prepared shards, seq_len 65,536", f"{result['prepared_tokens_per_s']:,.0f}",
         f"{result['prepared_over_target']:.1f}x the 20M tokens/s target"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"corpus: {len(texts)} documents, {result['chars']:,} chars, {tok_d:,} tokens; tokenizer {tokenizer_dir}")
    print(f"{'path':<{width}}  {'tokens/s':>14}  ratio")
    for name, rate, ratio in rows:
        print(f"{name:<{width}}  {rate:>14}  {ratio}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
