"""`lwm-jax data sample`: an offline demo corpus in SlimPajama format built only from text that ships
with Python (standard-library sources, tests and docstrings as three sources, plus chat records made
from docstrings), and a byte-level BPE tokenizer trained on it with Llama-3's special tokens.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import json
import os
import platform
import sysconfig
from pathlib import Path

import zstandard
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lwm_jax.data.tokenize import EOT_TOKEN
from lwm_jax.errors import UserError
from lwm_jax.outputs import check_output_dir, staged_folder
from lwm_jax.progress import log

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOT_TOKEN)
# Llama-3 Instruct's chat template (the revision that honours add_generation_prompt).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Llama-3's pre-tokenizer split (numbers in groups of up to three, contractions, letters, ...).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS_FILES = 4
MIN_DOC_CHARS = 60_000  # code of one package is cut into documents of at least this size
TRAIN_CHARS = 4_000_000  # text the tokenizer is trained on


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative path, path) of every standard-library .py file, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] in ("site-packages", "dist-packages") or "__pycache__" in rel:
            continue
        out.append((rel, path))
    return sorted(out)


def _texts(files: list[tuple[str, Path]]):
    """(relative path, text) of the files that decode as UTF-8, in order, read lazily."""
    for rel, path in files:
        try:
            yield rel, path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def is_test_file(rel: str) -> bool:
    """Whether a standard-library relative path is test code (under test/ or a tests/ folder, or test_*.py)."""
    parts = rel.split("/")
    return parts[0] == "test" or "tests" in parts[:-1] or parts[-1].startswith("test_")


def _code_documents(files, max_chars: int) -> list[str]:
    """Module sources grouped by top-level package, cut into documents of >= MIN_DOC_CHARS."""
    docs, current, group, total = [], [], None, 0
    for rel, text in _texts(files):
        top = rel.split("/")[0]
        if current and (top != group or sum(map(len, current)) >= MIN_DOC_CHARS):
            docs.append("".join(current))
            total += len(docs[-1])
            current = []
            if total >= max_chars:
                return docs
        group = top
        current.append(f"# File: Lib/{rel}\n{text}\n")
    if current:
        docs.append("".join(current))
    return docs


def _test_documents(files, max_chars: int) -> list[str]:
    docs, total = [], 0
    for rel, text in _texts(files):
        if total >= max_chars:
            break
        docs.append(f"# File: Lib/{rel}\n{text}")
        total += len(docs[-1])
    return docs


def docstring_documents(files, max_chars: int, max_chats: int) -> tuple[list[str], list[dict]]:
    """Docstring documents (one per module, about `max_chars` characters in all) and up to `max_chats`
    chat records about documented functions, from (relative path, path) `files` in order."""
    docs, chats, total = [], [], 0
    for rel, text in _texts(files):
        if total >= max_chars and len(chats) >= max_chats:
            break
        doc, conv = _docstrings(rel, text)
        if doc and total < max_chars:
            docs.append(doc)
            total += len(doc)
        chats.extend(conv[: max(0, max_chats - len(chats))])
    return docs, chats


def _docstrings(rel: str, text: str) -> tuple[str | None, list[dict]]:
    """A module's docstring document and chat records about its documented functions."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None, []
    module = rel[:-3].replace("/", ".").removesuffix(".__init__")
    lines, chats = [], []
    doc = ast.get_docstring(tree)
    if doc:
        lines.append(f"Module {module}\n\n{doc}\n")
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        if isinstance(node, ast.ClassDef):
            lines.append(f"class {module}.{node.name}\n\n{doc}\n")
            continue
        signature = f"{node.name}({ast.unparse(node.args)})"
        lines.append(f"{module}.{signature}\n\n{doc}\n")
        first = doc.split("\n\n")[0].strip()
        if len(first) >= 40 and not node.name.startswith("_"):
            chats.append({"messages": [
                {"role": "user", "content": f"What does `{module}.{node.name}` do?"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "What is its signature?"},
                {"role": "assistant", "content": f"`{module}.{signature}`"}]})
    return ("\n".join(lines) if lines else None), chats


def _write_jsonl_zst(path: Path, records: list[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))


def _train_tokenizer(texts: list[str], vocab_size: int):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # ids after the BPE vocabulary, as in Llama-3
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), _bos_first(tok)])
    return tok


def _bos_first(tok) -> processors.TemplateProcessing:
    """The post-processor that puts BOS before each sequence, as Llama-3's does."""
    bos = SPECIAL_TOKENS[0]
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                         special_tokens=[(bos, tok.token_to_id(bos))])


def task_tokenizer(texts: list[str], vocab_size: int):
    """A word-level tokenizer made for the retrieval miniature: numbers in groups of two digits (a
    5-digit passkey is 3 tokens), the words and marks of the passkey and NIAH templates, then the
    corpus's most frequent words up to `vocab_size` (anything else is `<unk>`), Llama-3's special
    tokens last. A small model's embedding and head stay small (4,096 BPE tokens cost the
    miniature most of its parameters and steps); with single digits most keys repeat a digit, and
    copying them needs more than the one-token lookup a 2-layer induction circuit learns first."""
    from lwm_jax.data.synthetic import template_text

    split = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                     pre_tokenizers.Split(Regex(r"\d\d?"), behavior="isolated")])
    words = lambda text: [w for w, _ in split.pre_tokenize_str(text)]
    numbers = [str(d) for d in range(10)] + [f"{d:02d}" for d in range(100)]
    vocab = {w: None for w in numbers + words(template_text())}
    counts = collections.Counter(w for text in texts for w in words(text))
    room = vocab_size - len(SPECIAL_TOKENS) - 1 - len(vocab)
    if room < 0:
        raise UserError(f"vocab_size={vocab_size} is too small for the task tokenizer (needs at least "
                        f"{vocab_size - room})")
    for w in sorted((w for w in counts if w not in vocab), key=lambda w: (-counts[w], w))[:room]:
        vocab[w] = None
    ids = {w: i for i, w in enumerate([*vocab, "<unk>"])}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = _bos_first(tok)
    return tok


TOKENIZER_KINDS = ("bpe", "task")


def build_sample(out_dir: str | Path, *, vocab_size: int = 4096, max_chars_per_source: int = 6_000_000,
                 overwrite: bool = False, progress: bool = False, tokenizer: str = "bpe") -> dict:
    """Writes `corpus/*.jsonl.zst`, `chat/chat.jsonl.zst` and `tokenizer/` under `out_dir`.

    `tokenizer`: "bpe" (byte-level BPE trained on the corpus) or "task" (`task_tokenizer`, for
    the retrieval miniature).

    Deterministic for a given Python installation. Returns a summary (sources, documents,
    characters, files, vocabulary size, sha256 of every file written).
    """
    if not (isinstance(vocab_size, int) and 512 <= vocab_size <= 65536):
        raise UserError(f"vocab_size={vocab_size!r} must be an integer in [512, 65536]")
    if not (isinstance(max_chars_per_source, int) and max_chars_per_source > 0):
        raise UserError(f"max_chars_per_source={max_chars_per_source!r} must be a positive integer")
    if tokenizer not in TOKENIZER_KINDS:
        raise UserError(f"tokenizer={tokenizer!r} is not one of {', '.join(TOKENIZER_KINDS)}")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise UserError(f"output {out} exists and is not an empty folder; pass --overwrite or choose a new folder")
    check_output_dir(out, "OUT_DIR")
    with staged_folder(out) as stage:
        summary = _write_sample(stage, out, vocab_size=vocab_size, max_chars_per_source=max_chars_per_source,
                                progress=progress, tokenizer=tokenizer)
    return summary


def _write_sample(out: Path, shown: Path, *, vocab_size: int, max_chars_per_source: int, progress: bool,
                  tokenizer: str) -> dict:
    """Writes the corpus, chat records, tokenizer and sample.json into the folder `out` (its
    temporary name; `shown` is the one messages name); returns the summary."""
    step = log if progress else (lambda message: None)
    step("sample: reading the Python standard library's sources")
    files = stdlib_files()
    if not files:
        raise UserError(f"no standard-library sources found under {sysconfig.get_paths()['stdlib']}")
    code = [f for f in files if not is_test_file(f[0])]
    tests = [f for f in files if is_test_file(f[0])]
    sources = {"stdlib_code": _code_documents(code, max_chars_per_source)}
    sources["stdlib_docs"], chats = docstring_documents(code, max_chars_per_source, max_chars_per_source // 1500)
    sources["stdlib_tests"] = _test_documents(tests, max_chars_per_source)

    step(f"sample: writing the corpus to {shown / 'corpus'}")
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    (out / "chat").mkdir(exist_ok=True)
    (out / "tokenizer").mkdir(exist_ok=True)
    records = [{"text": doc, "meta": {"redpajama_set_name": name}}
               for name, docs in sources.items() for doc in docs]
    records.sort(key=lambda r: hashlib.sha256(r["text"].encode()).hexdigest())  # interleave the sources
    written = []
    for k in range(CORPUS_FILES):
        path = out / "corpus" / f"train-{k:05d}-of-{CORPUS_FILES:05d}.jsonl.zst"
        _write_jsonl_zst(path, records[k::CORPUS_FILES])
        written.append(path)
    _write_jsonl_zst(out / "chat" / "chat-00000-of-00001.jsonl.zst", chats)
    written.append(out / "chat" / "chat-00000-of-00001.jsonl.zst")
    step(f"sample: training the {tokenizer} tokenizer")

    train_texts, n = [], 0
    for record in records:
        if n >= TRAIN_CHARS:
            break
        train_texts.append(record["text"])
        n += len(record["text"])
    tok = (_train_tokenizer if tokenizer == "bpe" else task_tokenizer)(train_texts, vocab_size)
    # Written by Python, not `tok.save`: a refused write is then an OSError like every other.
    (out / "tokenizer" / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    config = {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "chat_template": LLAMA3_CHAT_TEMPLATE,
              "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
              "model_max_length": 1 << 30, "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    written += [out / "tokenizer" / "tokenizer.json", out / "tokenizer" / "tokenizer_config.json"]
    summary = {
        "python": platform.python_version(), "out_dir": str(shown), "tokenizer": tokenizer,
        "vocab_size": tok.get_vocab_size(),
        "sources": {name: {"documents": len(docs), "chars": sum(map(len, docs))} for name, docs in sources.items()},
        "chat_records": len(chats),
        "files": {os.path.relpath(p, out): hashlib.sha256(p.read_bytes()).hexdigest() for p in written},
    }
    (out / "sample.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
