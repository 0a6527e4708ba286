"""Tokenization with Hugging Face `tokenizers` from a local tokenizer folder: the checked tokenizer
description (BOS/EOS ids, hash, chat template) and the grain transform that turns one work unit of
raw records into BOS+document+EOS token arrays per source, with the long-document filter applied.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import grain
import numpy as np
from tokenizers import Tokenizer

from lwm_jax.config import PrepareConfig
from lwm_jax.data.chat import ChatTemplate, encode_chats
from lwm_jax.data.mixture import keep_documents
from lwm_jax.data.packing import with_bos_eos
from lwm_jax.data.sources import Doc, WorkUnit, read_unit
from lwm_jax.errors import UserError

EOT_TOKEN = "<|eot_id|>"  # Llama-3's end of a chat turn: generation stops at it
TEXT_BATCH_CHARS = 4 << 20  # characters handed to the batch encoder at once
TEXT_BATCH_DOCS = 4096
CHAT_BATCH = 256
_LLAMA3_BOS, _LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """A checked local tokenizer: files, content hash, vocabulary size, BOS/EOS and chat template."""

    directory: str
    tokenizer_file: str
    sha256: str
    vocab_size: int
    bos_token: str
    eos_token: str
    bos_id: int
    eos_id: int
    chat_template: str | None
    special_tokens: tuple[tuple[str, str], ...]  # template variables: bos_token, eos_token, ...

    def to_manifest(self) -> dict:
        return {"directory": self.directory, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_token": self.bos_token, "eos_token": self.eos_token, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "chat_template": self.chat_template is not None}


_TOKENIZERS: dict[str, object] = {}


def get_tokenizer(tokenizer_file: str):
    """The `tokenizers.Tokenizer` of a file, loaded once per process."""
    if tokenizer_file not in _TOKENIZERS:
        _TOKENIZERS[tokenizer_file] = Tokenizer.from_file(tokenizer_file)
    return _TOKENIZERS[tokenizer_file]


def _token_str(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _tokenizer_config(directory: Path) -> dict:
    """The folder's `tokenizer_config.json` ({} when there is none)."""
    config_file = directory / "tokenizer_config.json"
    if not config_file.is_file():
        return {}
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{config_file} is not valid JSON: {err}") from None


def _chat_template(directory: Path, config: dict):
    """The chat template: `chat_template.jinja`, else the config's (its "default" when named)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template


def load_tokenizer_info(path: str | Path) -> TokenizerInfo:
    """Checks a tokenizer folder (or a `tokenizer.json` file) and reads what packing needs.

    BOS/EOS come from `tokenizer_config.json` (`bos_token`, `eos_token`), else Llama-3's names when
    the vocabulary has them. The chat template comes from `chat_template.jinja` or the config.
    """
    path = Path(path).expanduser()
    file = path if path.is_file() else path / "tokenizer.json"
    if not path.exists():
        raise UserError(f"tokenizer {path} does not exist (give a folder holding tokenizer.json)")
    if not file.is_file():
        raise UserError(f"tokenizer folder {path} has no tokenizer.json (a Hugging Face `tokenizers` file)")
    try:
        raw = file.read_bytes()
        tok = get_tokenizer(str(file.resolve()))
    except OSError as err:
        raise UserError(f"tokenizer {file} is not readable: {err.strerror or err}") from None
    except Exception as err:
        raise UserError(f"tokenizer {file} does not load: {str(err).splitlines()[0]}") from None
    directory = file.parent
    config = _tokenizer_config(directory)
    bos = _token_str(config.get("bos_token")) or (_LLAMA3_BOS if tok.token_to_id(_LLAMA3_BOS) is not None else None)
    eos = _token_str(config.get("eos_token")) or (_LLAMA3_EOS if tok.token_to_id(_LLAMA3_EOS) is not None else None)
    if bos is None or eos is None:
        raise UserError(f"tokenizer {directory}: cannot tell the BOS/EOS tokens; add a tokenizer_config.json "
                        "with bos_token and eos_token")
    ids = {}
    for role, token in (("bos", bos), ("eos", eos)):
        ids[role] = tok.token_to_id(token)
        if ids[role] is None:
            raise UserError(f"tokenizer {directory}: {role}_token {token!r} is not in the vocabulary")
    template = _chat_template(directory, config)
    special = {"bos_token": bos, "eos_token": eos}
    for key in ("pad_token", "unk_token"):
        if _token_str(config.get(key)):
            special[key] = _token_str(config[key])
    return TokenizerInfo(
        directory=str(directory.resolve()), tokenizer_file=str(file.resolve()),
        sha256=hashlib.sha256(raw).hexdigest(), vocab_size=tok.get_vocab_size(with_added_tokens=True),
        bos_token=bos, eos_token=eos, bos_id=ids["bos"], eos_id=ids["eos"],
        chat_template=template if isinstance(template, str) and template.strip() else None,
        special_tokens=tuple(sorted(special.items())))


def flatten_ids(id_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 concatenated, lengths int64) of a list of token-id lists."""
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def encode_texts(tokenizer, texts: list[str]) -> list[list[int] | None]:
    """Token ids of each text with the batch encoder; None for a text the tokenizer rejects."""
    try:
        return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    except Exception:  # e.g. a lone surrogate from a JSON escape: find the bad text(s) one by one
        out = []
        for text in texts:
            try:
                out.append(tokenizer.encode(text, add_special_tokens=False).ids)
            except Exception:
                out.append(None)
        return out


class _SourceParts:
    """Per-source accumulation of one unit: kept documents (flat tokens + lengths) and counts."""

    def __init__(self, kind: str):
        self.kind = kind
        self.tokens: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.documents = 0
        self.content_tokens = 0

    def result(self) -> dict:
        cat = lambda xs, dt: np.concatenate(xs).astype(dt, copy=False) if xs else np.zeros(0, dt)
        return {"kind": self.kind, "tokens": cat(self.tokens, np.int32), "lengths": cat(self.lengths, np.int64),
                "mask": cat(self.masks, np.uint8) if self.kind == "chat" else None,
                "documents": self.documents, "content_tokens": self.content_tokens}


class _UnitTokenizer:
    """The state of tokenizing one work unit: its kept documents per source, its counts, and the
    batches of texts and chats waiting for the batch encoders."""

    def __init__(self, info: TokenizerInfo, config: PrepareConfig, unit_index: int):
        self.info, self.config = info, config
        self.tok = get_tokenizer(info.tokenizer_file)
        self.template = ChatTemplate(info.chat_template, dict(info.special_tokens)) if info.chat_template else None
        self.counts: collections.Counter = collections.Counter()
        self.rng = np.random.default_rng([config.seed, unit_index])
        self.parts: dict[tuple[str, str], _SourceParts] = {}
        self.texts: list[str] = []
        self.text_sources: list[str] = []
        self.text_chars = 0
        self.chats: list[Doc] = []

    def part(self, source: str, kind: str) -> _SourceParts:
        return self.parts.setdefault((source, kind), _SourceParts(kind))

    def add(self, doc: Doc) -> None:
        """Queues (or, for pre-tokenized records, adds) one document."""
        self.counts["valid_records"] += 1
        if doc.kind == "text":
            self.texts.append(doc.payload)
            self.text_sources.append(doc.source)
            self.text_chars += len(doc.payload)
            if self.text_chars >= TEXT_BATCH_CHARS or len(self.texts) >= TEXT_BATCH_DOCS:
                self.flush_texts()
        elif doc.kind == "tokens":
            self.flush_texts()  # keep the keep-or-drop draws in document order
            self.add_plain([doc.source], doc.payload, np.array([len(doc.payload)], np.int64))
        elif self.template is None:
            self.counts["no_chat_template"] += 1
        else:
            self.chats.append(doc)
            if len(self.chats) >= CHAT_BATCH:
                self.flush_chats()

    def add_plain(self, sources: list[str], flat: np.ndarray, lengths: np.ndarray) -> None:
        """Documents `flat` (tokens, `lengths` each) of `sources`, kept or dropped by length."""
        cfg, info = self.config, self.info
        keep = keep_documents(lengths, self.rng, cfg.min_doc_tokens, cfg.short_keep_prob)
        src = np.asarray(sources)
        for name in dict.fromkeys(sources):
            is_src = src == name
            p = self.part(name, "text")
            p.documents += int(is_src.sum())
            p.content_tokens += int(lengths[is_src].sum())
            sel = is_src & keep
            tokens, new_lengths = with_bos_eos(flat[np.repeat(sel, lengths)], lengths[sel], info.bos_id, info.eos_id)
            p.tokens.append(tokens)
            p.lengths.append(new_lengths)

    def flush_texts(self) -> None:
        if not self.texts:
            return
        encoded = encode_texts(self.tok, self.texts)
        good = [i for i, ids in enumerate(encoded) if ids is not None]
        self.counts["invalid_utf8"] += len(encoded) - len(good)
        self.add_plain([self.text_sources[i] for i in good], *flatten_ids([encoded[i] for i in good]))
        self.texts, self.text_sources, self.text_chars = [], [], 0

    def flush_chats(self) -> None:
        if not self.chats:
            return
        results = encode_chats(self.tok, self.template, [d.payload for d in self.chats], self.info.bos_id)
        for doc, res in zip(self.chats, results):
            if res is None:
                self.counts["malformed_messages"] += 1
                continue
            ids, mask = res
            p = self.part(doc.source, "chat")
            p.documents += 1
            p.content_tokens += len(ids)
            p.tokens.append(ids)
            p.lengths.append(np.array([len(ids)], np.int64))
            p.masks.append(mask)
        self.chats = []


class TokenizeUnit(grain.transforms.Map):
    """grain transform: `WorkUnit` -> {"unit", "counts", "sources": {name: kept documents}}.

    Runs in grain worker processes (or threads); the tokenizer is loaded once per process. The
    keep-or-drop draw for short documents uses a generator seeded by (seed, unit index), so the
    result does not depend on how many workers run.
    """

    def __init__(self, info: TokenizerInfo, config: PrepareConfig):
        self.info = info
        self.config = config

    def map(self, unit: WorkUnit) -> dict:
        state = _UnitTokenizer(self.info, self.config, unit.index)
        for doc in read_unit(unit, self.config, self.info.vocab_size, state.counts):
            state.add(doc)
        state.flush_texts()
        state.flush_chats()
        return {"unit": unit.index, "counts": dict(state.counts),
                "sources": {key: p.result() for key, p in state.parts.items()}}
