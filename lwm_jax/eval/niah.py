"""Needle in a haystack over a grid of context lengths and depths: haystacks from text files or
the demo corpus (never silently repeated), the needle at a sentence boundary, the chat template
counted in the length, scored teacher-forced (and generated, when asked); JSON and a heatmap.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zstandard

from lwm_jax.data.sample import docstring_documents, is_test_file, stdlib_files
from lwm_jax.data.synthetic import niah_sample, split_sentences
from lwm_jax.errors import UserError
from lwm_jax.eval import plots
from lwm_jax.eval.probes import ChatWrap, build_to_length, cell_seed, probe_from_sample
from lwm_jax.eval.scoring import LogitsFn, by_length, intervals_by_length, run_grid
from lwm_jax.outputs import staged_folder

DEFAULT_DEPTHS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEMO_CHARS_PER_TOKEN = 8  # generous: the demo haystack is read until it holds enough tokens


def read_documents(path: Path, what: str = "haystack file") -> list[str]:
    """A plain text file as one document, or the `text` fields of a .jsonl / .jsonl.zst / .jsonl.gz
    file; `what` names the file in errors ("haystack file", "--data file")."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    raw = path.read_bytes()
    name = path.name
    if name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
        name = name[:-4]
    elif name.endswith(".gz"):
        raw, name = gzip.decompress(raw), name[:-3]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None
    if name.endswith(".jsonl"):
        docs = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"{path} line {i + 1} is not JSON") from None
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                docs.append(record["text"])
        return docs
    return [text]


def _read_text(path: Path) -> str:
    return "\n\n".join(read_documents(path))


@functools.lru_cache(maxsize=8)
def demo_haystack(min_tokens: int) -> str:
    """The demo corpus's natural-language source (standard-library docstrings), enough for `min_tokens`.
    Cached: parsing the standard library takes seconds, and evaluations ask again per length."""
    files = [f for f in stdlib_files() if not is_test_file(f[0])]
    docs, _ = docstring_documents(files, DEMO_CHARS_PER_TOKEN * min_tokens + 20_000, 0)
    return "\n\n".join(docs)


class Haystack:
    """A haystack text cut into sentences with their token counts (encoded as the probe encodes them)."""

    def __init__(self, name: str, text: str, tokenizer):
        self.name = name
        self.sentences = split_sentences(text)
        counts = [len(e.ids) for e in tokenizer.encode_batch([" " + s for s in self.sentences],
                                                             add_special_tokens=False)]
        self.cumulative = np.cumsum(counts)

    @property
    def tokens(self) -> int:
        return int(self.cumulative[-1])

    def take(self, tokens: int) -> str:
        """The leading sentences holding at least `tokens` tokens; a UserError when it is too short."""
        if tokens > self.tokens:
            raise UserError(f"haystack {self.name} holds {self.tokens:,} tokens, shorter than one sample of "
                            f"{tokens:,} tokens; give a longer text or smaller --lengths")
        m = int(np.searchsorted(self.cumulative, tokens)) + 1
        return " ".join(self.sentences[:m])


def load_haystacks(paths: Sequence[str] | None, tokenizer, max_length: int) -> list[Haystack]:
    """One `Haystack` per file (the demo corpus when none), each checked to hold `max_length` tokens."""
    if paths:
        stacks = [Haystack(str(p), _read_text(Path(p)), tokenizer) for p in paths]
    else:
        stacks = [Haystack("demo-corpus", demo_haystack(max_length), tokenizer)]
    for stack in stacks:
        stack.take(max_length)
    return stacks


def check_grid(lengths: Sequence[int], depths: Sequence[float]) -> None:
    if not lengths or any(not isinstance(n, int) or n <= 0 for n in lengths):
        raise UserError(f"lengths={list(lengths)} must be positive integers")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise UserError(f"depths={list(depths)} must lie in [0, 1] (fractions of the haystack)")


def niah_eval(logits_fn: LogitsFn, tokenizer, *, lengths: Sequence[int], depths: Sequence[float] = DEFAULT_DEPTHS,
              samples: int = 1, haystacks: list[Haystack], seed: int = 0, chat: ChatWrap | None = None,
              bos_id: int | None = None, generate_fn=None) -> dict:
    """Scores NIAH over the grid; sample k of a cell uses haystack k mod len(haystacks).

    Returns {"task", "cells": [...], "by_length": {length: score}, "score"} (+ generated scores).
    """
    check_grid(lengths, depths)

    def make(length: int, depth: float, k: int):
        stack = haystacks[k % len(haystacks)]
        text = stack.take(length)
        s = cell_seed(seed, length, depth, k)
        return build_to_length(lambda n: probe_from_sample(
            niah_sample(tokenizer, n, depth, s, haystack=text, bos_id=None if chat else bos_id), chat), length)

    cells = run_grid(make, logits_fn, lengths=lengths, depths=depths, samples=samples, desc="niah",
                     generate_fn=generate_fn, tokenizer=tokenizer)
    return summarize("niah", cells, generate_fn is not None,
                     haystacks=[h.name for h in haystacks], chat=chat is not None, seed=seed)


def summarize(task: str, cells: list[dict], generated: bool, **extra) -> dict:
    """The result object of a probe grid: cells, score by length (with probes, hits and the Wilson
    95% interval of each length's exact-match share), overall score."""
    result = {"task": task, **extra, "cells": cells,
              "by_length": {str(k): v for k, v in by_length(cells).items()},
              "interval_by_length": {str(k): v for k, v in intervals_by_length(cells).items()},
              "score": float(np.mean([c["score"] for c in cells]))}
    if generated:
        result["generated_by_length"] = {str(k): v for k, v in by_length(cells, "generated_score").items()}
        result["generated_score"] = float(np.mean([c["generated_score"] for c in cells]))
    return result


def write_results(result: dict, out_dir: str | Path, stem: str, title: str, heatmap: bool) -> dict[str, str]:
    """Writes OUT/{stem}.json (every cell and sample) and OUT/{stem}.png, all or none
    (`staged_folder`); returns the paths."""
    out = Path(out_dir)
    names = {"json": f"{stem}.json", "png": f"{stem}.png"}
    with staged_folder(out) as stage:
        (stage / names["json"]).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        if heatmap:
            ykey = "task" if result["task"] == "ruler" else "depth"
            plots.niah_heatmap(result["cells"], stage / names["png"], title, ykey=ykey)
            if "generated_score" in result:
                names["png_generated"] = f"{stem}_generated.png"
                plots.niah_heatmap(result["cells"], stage / names["png_generated"], title + " (generated)",
                                   key="generated_score", ykey=ykey)
        else:
            scores = result["by_length"]
            plots.line_plot({"teacher-forced": ([int(k) for k in scores], list(scores.values()))},
                            stage / names["png"], title, "context length (tokens)", "exact match", logx=True)
    return {key: str(out / name) for key, name in names.items()}
