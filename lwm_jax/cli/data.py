"""`lwm-jax data prepare` and `data sample`: argument parsing and printing only, over
`lwm_jax.data.prepare.prepare` and `lwm_jax.data.sample.build_sample`. `register(subparsers)` is
called by `lwm_jax.cli.build_parser`; handlers take the parsed args and return an exit code.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from lwm_jax.cli.common import command
from lwm_jax.config import PrepareConfig
from lwm_jax.data.prepare import prepare
from lwm_jax.data.sample import TOKENIZER_KINDS, build_sample

PREPARE_EPILOG = """\
inputs:
  files, directories (searched recursively), or globs of .jsonl, .jsonl.zst, .parquet
  (SlimPajama records {"text": ..., "meta": {"redpajama_set_name": ...}} or chat records
  {"messages": [{"role": ..., "content": ...}, ...]}) and .array_record (one pre-tokenized
  document per record, little-endian int32 ids). Prefix NAME= to set the source name of every
  record in those files, e.g. RedPajamaBook=books/*.parquet or chat=sft/*.jsonl.

example:
  lwm-jax data prepare 'slimpajama/train/chunk1/*.jsonl.zst' --tokenizer llama3/ \\
      --out data/slimpajama-65536 --seq-len 65536 --min-doc-tokens 4096 --short-keep-prob 0.3
"""

SAMPLE_EPILOG = """\
writes:
  OUT_DIR/corpus/*.jsonl.zst    SlimPajama-format text, sources stdlib_code, stdlib_docs, stdlib_tests
  OUT_DIR/chat/*.jsonl.zst      chat records (questions about documented functions)
  OUT_DIR/tokenizer/            tokenizer.json + tokenizer_config.json (Llama-3 special tokens and
                                chat template), a byte-level BPE trained on the corpus
  OUT_DIR/sample.json           what was written, with sha256 of every file

then:
  lwm-jax data prepare OUT_DIR/corpus OUT_DIR/chat --tokenizer OUT_DIR/tokenizer \\
      --out OUT_DIR/prepared-2048 --seq-len 2048
"""


def register(subparsers) -> argparse.ArgumentParser:
    """Adds `data` (with `prepare` and `sample`) to the CLI's sub-command parsers."""
    data = subparsers.add_parser("data", help="prepare training data; write the offline demo corpus",
                                 description="Prepare long-context training data (tokenize, pack, shard) "
                                             "and write the offline demo corpus.")
    sub = data.add_subparsers(dest="data_command", metavar="{prepare,sample}", required=True)
    _add_prepare(sub)
    _add_sample(sub)
    return data


def _add_prepare(sub) -> None:
    p = command(sub, "prepare", prepare_command, help="tokenize and pack raw text into array_record shards",
                epilog=PREPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="file, directory, glob, or NAME=PATTERN")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="folder with tokenizer.json "
                   "(and tokenizer_config.json for BOS/EOS and the chat template)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--seq-len", required=True, type=int, metavar="N",
                   help="training sequence length; records hold N+1 tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the keep-or-drop draws (default 0)")
    p.add_argument("--min-doc-tokens", type=int, default=4096, metavar="N",
                   help="text documents of at least N tokens are always kept (default 4096)")
    p.add_argument("--short-keep-prob", type=float, default=0.5, metavar="P",
                   help="probability of keeping a shorter text document (default 0.5; 1 keeps all)")
    p.add_argument("--text-key", default="text", help="field holding the text (default text)")
    p.add_argument("--messages-key", default="messages", help="field holding chat messages (default messages)")
    p.add_argument("--source-key", default="meta.redpajama_set_name",
                   help="dotted field naming the source (default meta.redpajama_set_name)")
    p.add_argument("--default-source", default="default", help="source of text records without one")
    p.add_argument("--chat-source", default="chat", help="source name of chat records (default chat)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="grain worker processes tokenizing (default 0: threads in this process, the "
                        "tokenizer itself uses every core)")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, metavar="N",
                   help="tokens per shard file before a new one starts (default 2^28)")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared dataset already in --out")


def _add_sample(sub) -> None:
    s = command(sub, "sample", sample_command, help="write the offline demo corpus and tokenizer",
                epilog=SAMPLE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("out_dir", metavar="OUT_DIR", help="output folder (new or empty)")
    s.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary incl. special tokens "
                                                                "(default 4096)")
    s.add_argument("--max-chars-per-source", type=int, default=6_000_000, metavar="N",
                   help="characters of text per source (default 6,000,000)")
    s.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="bpe",
                   help="bpe: byte-level BPE trained on the corpus (default); task: a word-level vocabulary made "
                        "for the passkey / NIAH miniature (2-digit number tokens, the probe templates' words, "
                        "then the corpus's most frequent words; the rest <unk>)")
    s.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")


def _console():
    console = Console(highlight=False)
    if not console.is_terminal:  # piped or logged: do not squeeze tables into 80 columns
        console.width = 160
    return console


def prepare_command(args) -> int:
    """Tokenize raw inputs once, pack each source into sequences of seq_len+1 tokens and write
    array_record shards plus manifest.json to --out."""
    config = PrepareConfig(
        seq_len=args.seq_len, seed=args.seed, text_key=args.text_key, messages_key=args.messages_key,
        source_key=args.source_key, default_source=args.default_source, chat_source=args.chat_source,
        min_doc_tokens=args.min_doc_tokens, short_keep_prob=args.short_keep_prob, workers=args.workers,
        shard_tokens=args.shard_tokens)
    manifest = prepare(args.inputs, args.tokenizer, args.out, config, overwrite=args.overwrite, progress=True)

    console = _console()
    table = Table(title=f"prepared {args.out} (seq_len {config.seq_len})")
    for col in ("source", "kind", "documents", "kept", "tokens", "kept tokens", "sequences", "padding"):
        table.add_column(col, justify="left" if col in ("source", "kind") else "right")
    for name, s in manifest["sources"].items():
        table.add_row(name, s["kind"], f"{s['documents']:,}", f"{s['kept_documents']:,}",
                      f"{s['content_tokens']:,}", f"{s['kept_tokens']:,}", f"{s['sequences']:,}",
                      f"{s['padding_tokens']:,}")
    console.print(table)
    skipped = {k: v for k, v in manifest["skipped"].items() if v}
    if skipped:
        console.print("skipped: " + ", ".join(f"{k} {v:,}" for k, v in skipped.items()))
        for path in manifest["empty_files"]:
            console.print(f"  empty file: {path}")
        for path in manifest["corrupt_files"]:
            console.print(f"  corrupt file (records before the damage kept): {path}")
    else:
        console.print("skipped: nothing")
    totals = manifest["totals"]
    rate = totals["kept_tokens"] / max(totals["seconds"], 1e-9)
    console.print(f"{totals['kept_tokens']:,} tokens in {totals['sequences']:,} sequences, "
                  f"{totals['seconds']:.1f} s ({rate:,.0f} tokens/s)")
    if args.json:
        summary = {"out": str(args.out), "seq_len": config.seq_len, "valid_records": manifest["valid_records"],
                   "skipped": manifest["skipped"],
                   "sources": {n: {k: v for k, v in s.items() if k != "shards"}
                               for n, s in manifest["sources"].items()},
                   "kept_tokens": totals["kept_tokens"], "sequences": totals["sequences"],
                   "seconds": totals["seconds"], "tokens_per_s": rate}
        print(json.dumps(summary))
    return 0


def sample_command(args) -> int:
    """Write a SlimPajama-format demo corpus built only from text that ships with Python, chat
    records, and a BPE tokenizer trained on it (no download). Deterministic for a given Python
    installation."""
    summary = build_sample(args.out_dir, vocab_size=args.vocab_size,
                           max_chars_per_source=args.max_chars_per_source, overwrite=args.overwrite,
                           progress=True, tokenizer=args.tokenizer)
    console = _console()
    table = Table(title=f"demo corpus in {args.out_dir} (Python {summary['python']})")
    for col in ("source", "documents", "characters"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for name, s in summary["sources"].items():
        table.add_row(name, f"{s['documents']:,}", f"{s['chars']:,}")
    table.add_row("chat (records)", f"{summary['chat_records']:,}", "")
    console.print(table)
    kind = "byte-level BPE" if args.tokenizer == "bpe" else "word-level, for the retrieval miniature"
    console.print(f"tokenizer: {args.out_dir}/tokenizer ({kind}, vocab {summary['vocab_size']:,})")
    console.print(f"next: lwm-jax data prepare {args.out_dir}/corpus {args.out_dir}/chat "
                  f"--tokenizer {args.out_dir}/tokenizer --out {args.out_dir}/prepared-2048 --seq-len 2048")
    if args.json:
        print(json.dumps(summary))
    return 0
