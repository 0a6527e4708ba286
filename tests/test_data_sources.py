"""Raw inputs: every format gives the same documents, files split into units cover each line once,
bad records and files are skipped and counted, and unusable paths or tokenizers fail before any work."""

import argparse
import builtins
import collections
import dataclasses
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

import lwm_jax.data.sources as sources
from lwm_jax.cli import data as commands
from lwm_jax.config import PrepareConfig
from lwm_jax.data.manifest import load_manifest
from lwm_jax.data.packing import decode_record
from lwm_jax.data.prepare import prepare
from lwm_jax.data.sources import WorkUnit, plan_inputs, read_unit
from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info
from lwm_jax.errors import UserError
from tests.conftest import require_llama3_tokenizer

CONFIG = PrepareConfig(seq_len=64, short_keep_prob=1.0)
DOCS = [{"text": f"Document {i}: " + " ".join(f"word{j}" for j in range(i % 17 + 1)),
         "meta": {"redpajama_set_name": ("RedPajamaBook", "RedPajamaC4")[i % 2]}} for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer_dir():
    return require_llama3_tokenizer()


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _zst(path, data: bytes):
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


def _source_tokens(out_dir):
    """{source: concatenated real tokens of all its sequences} of a prepared dataset."""
    result = {}
    for name, src in load_manifest(out_dir)["sources"].items():
        parts = []
        for shard in src["shard_paths"]:
            reader = ArrayRecordReader(shard)
            parts += [(r := decode_record(b)).tokens[: r.n_real] for b in reader.read_all()]
            reader.close()
        result[name] = np.concatenate(parts)
    return result


def test_formats_give_the_same_documents(tokenizer_dir, tmp_path):
    (tmp_path / "a").mkdir()
    _jsonl(tmp_path / "a" / "docs.jsonl", DOCS)
    (tmp_path / "b").mkdir()
    _zst(tmp_path / "b" / "docs.jsonl.zst", "".join(json.dumps(r) + "\n" for r in DOCS).encode())
    (tmp_path / "c").mkdir()
    table = pa.table({"text": [d["text"] for d in DOCS], "meta": [d["meta"] for d in DOCS]})
    pq.write_table(table, tmp_path / "c" / "docs.parquet", row_group_size=7)
    # Pre-tokenized documents: one source per file, named with NAME=PATTERN.
    tok = get_tokenizer(load_tokenizer_info(tokenizer_dir).tokenizer_file)
    (tmp_path / "d").mkdir()
    for name in ("RedPajamaBook", "RedPajamaC4"):
        writer = ArrayRecordWriter(str(tmp_path / "d" / f"{name}.array_record"), "group_size:1")
        for d in DOCS:
            if d["meta"]["redpajama_set_name"] == name:
                writer.write(np.asarray(tok.encode(d["text"], add_special_tokens=False).ids, "<i4").tobytes())
        writer.close()
    results = {}
    for kind, inputs in {"jsonl": [str(tmp_path / "a")], "zst": [str(tmp_path / "b" / "*.jsonl.zst")],
                         "parquet": [str(tmp_path / "c" / "docs.parquet")],
                         "array_record": [f"{n}={tmp_path / 'd' / n}.array_record"
                                          for n in ("RedPajamaBook", "RedPajamaC4")]}.items():
        manifest = prepare(inputs, tokenizer_dir, tmp_path / f"out-{kind}", CONFIG)
        assert {n: s["documents"] for n, s in manifest["sources"].items()} == {"RedPajamaBook": 20, "RedPajamaC4": 20}
        assert sum(manifest["skipped"].values()) == 0
        results[kind] = _source_tokens(tmp_path / f"out-{kind}")
    for kind in ("zst", "parquet", "array_record"):
        for name in ("RedPajamaBook", "RedPajamaC4"):
            np.testing.assert_array_equal(results[kind][name], results["jsonl"][name], err_msg=f"{kind} {name}")


def test_jsonl_units_cover_each_line_once(tmp_path):
    path = _jsonl(tmp_path / "many.jsonl", DOCS * 5)
    plan = plan_inputs([str(path)], unit_bytes=300)
    assert len(plan.units) > 10
    counts = collections.Counter()
    texts = [d.payload for u in plan.units for d in read_unit(u, CONFIG, 128_256, counts)]
    assert texts == [d["text"] for d in DOCS * 5]
    assert sum(v for k, v in counts.items()) == 0


def test_bad_records_are_skipped_and_counted(tokenizer_dir, tmp_path):
    good = [json.dumps(d).encode() for d in DOCS[:6]]
    lines = [good[0], b'{"text": "unterminated', good[1], b'{"text": "bad \xff\xfe bytes"}', b"",
             b'{"meta": {"redpajama_set_name": "RedPajamaBook"}}', good[2], b'{"text": ""}', b'{"text": "  \\n "}',
             b'{"text": 42}', b"[1, 2, 3]", b'{"messages": "not a list"}', b'{"text": "lone \\ud800 surrogate"}',
             good[3]]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "in" / "empty.jsonl").write_bytes(b"")
    full = zstandard.ZstdCompressor().compress(b"\n".join(good[4:] * 200) + b"\n")
    (tmp_path / "in" / "truncated.jsonl.zst").write_bytes(full[: len(full) // 2])
    manifest = prepare([str(tmp_path / "in")], tokenizer_dir, tmp_path / "out", CONFIG)
    assert manifest["skipped"] == {
        "empty_files": 1, "corrupt_files": 1, "invalid_utf8": 2, "malformed_json": 2, "missing_text": 2,
        "empty_text": 2, "malformed_messages": 1, "bad_token_ids": 0, "no_chat_template": 0}
    assert manifest["empty_files"] == [str(tmp_path / "in" / "empty.jsonl")]
    assert manifest["corrupt_files"] == [str(tmp_path / "in" / "truncated.jsonl.zst")]
    docs = sum(s["documents"] for s in manifest["sources"].values())
    assert docs >= 4  # the good lines, plus what the truncated file held before the damage, if anything
    assert manifest["valid_records"] - 1 == docs  # the surrogate record parsed but failed to tokenize


def test_truncated_zst_keeps_the_lines_before_the_damage(tmp_path):
    rng = np.random.default_rng(0)
    records = [{"text": " ".join(map(str, rng.integers(0, 10**9, 200)))} for _ in range(300)]
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    frames = b"".join(zstandard.ZstdCompressor().compress(data[i:i + 50_000]) for i in range(0, len(data), 50_000))
    whole = tmp_path / "whole.jsonl.zst"
    whole.write_bytes(frames)
    counts = collections.Counter()
    texts = [d.payload for d in read_unit(WorkUnit(0, str(whole), "jsonl.zst", None), CONFIG, 10, counts)]
    assert texts == [r["text"] for r in records] and not counts  # multi-frame file read whole
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(frames[: len(frames) * 2 // 3])
    texts = [d.payload for d in read_unit(WorkUnit(0, str(cut), "jsonl.zst", None), CONFIG, 10, counts)]
    assert 0 < len(texts) < len(records) and texts == [r["text"] for r in records[: len(texts)]]
    assert counts["corrupt_files"] == 1


def test_cli_prints_the_skip_summary(tokenizer_dir, tmp_path, capsys):
    _jsonl(tmp_path / "docs.jsonl", DOCS[:5])
    with open(tmp_path / "docs.jsonl", "ab") as f:
        f.write(b"{broken\n")
    parser = argparse.ArgumentParser(prog="lwm-jax")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "prepare", str(tmp_path / "docs.jsonl"), "--tokenizer", str(tokenizer_dir),
                              "--out", str(tmp_path / "out"), "--seq-len", "32", "--json"])
    assert args.func(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any("malformed_json 1" in line for line in out)
    summary = json.loads(out[-1])
    assert summary["skipped"]["malformed_json"] == 1 and summary["valid_records"] == 5


@pytest.mark.parametrize("case", ["missing_input", "no_match", "bad_extension", "missing_tokenizer",
                                  "tokenizer_without_json", "broken_tokenizer", "out_not_empty",
                                  "bad_config"])
def test_unusable_inputs_fail_before_any_work(tokenizer_dir, tmp_path, case):
    good = str(_jsonl(tmp_path / "docs.jsonl", DOCS[:3]))
    inputs, tok, out = [good], tokenizer_dir, tmp_path / "out"
    if case == "missing_input":
        inputs, match = [good, str(tmp_path / "nope.jsonl")], "no such file"
    elif case == "no_match":
        inputs, match = [str(tmp_path / "*.parquet")], "matched no files"
    elif case == "bad_extension":
        (tmp_path / "notes.txt").write_text("hi")
        inputs, match = [str(tmp_path / "notes.txt")], "unsupported file type"
    elif case == "missing_tokenizer":
        tok, match = tmp_path / "no-tokenizer", "does not exist"
    elif case == "tokenizer_without_json":
        (tmp_path / "tok").mkdir()
        tok, match = tmp_path / "tok", "has no tokenizer.json"
    elif case == "broken_tokenizer":
        (tmp_path / "tok").mkdir()
        (tmp_path / "tok" / "tokenizer.json").write_text("{not json")
        tok, match = tmp_path / "tok", "does not load"
    elif case == "out_not_empty":
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
        match = "not empty"
    else:
        with pytest.raises(UserError, match="short_keep_prob=1.5 must be a probability"):
            PrepareConfig(seq_len=8, short_keep_prob=1.5)
        with pytest.raises(UserError, match="seq_len=0 must be a positive integer"):
            PrepareConfig(seq_len=0)
        return
    with pytest.raises(UserError, match=match) as err:
        prepare(inputs, tok, out, CONFIG)
    assert "\n" not in str(err.value)
    if case == "out_not_empty":
        assert os.listdir(out) == ["precious.txt"]
    else:
        assert not out.exists()  # nothing was created


def test_unreadable_file_fails_before_any_work(tokenizer_dir, tmp_path, monkeypatch):
    path = _jsonl(tmp_path / "secret.jsonl", DOCS[:2])
    path.chmod(0)
    if os.geteuid() == 0:  # root reads files whatever their mode: let the OS answer as it would anyone else

        def open_as_user(file, *args, **kwargs):
            if str(file) == str(path):
                raise PermissionError(13, "Permission denied", str(file))
            return builtins.open(file, *args, **kwargs)

        monkeypatch.setattr(sources, "open", open_as_user, raising=False)
    with pytest.raises(UserError, match="not readable"):
        prepare([str(path)], tokenizer_dir, tmp_path / "out", CONFIG)
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_a_prepared_dataset(tokenizer_dir, tmp_path):
    good = str(_jsonl(tmp_path / "docs.jsonl", DOCS[:3]))
    first = prepare([good], tokenizer_dir, tmp_path / "out", CONFIG)
    with pytest.raises(UserError, match="--overwrite"):
        prepare([good], tokenizer_dir, tmp_path / "out", CONFIG)
    second = prepare([good], tokenizer_dir, tmp_path / "out", CONFIG, overwrite=True)
    assert first["sources"] == second["sources"]


def test_long_document_filter_keeps_long_and_a_share_of_short(tokenizer_dir, tmp_path):
    docs = [{"text": ("long " * 300) if i % 4 == 0 else f"short {i}"} for i in range(800)]
    path = str(_jsonl(tmp_path / "docs.jsonl", docs))
    cfg = PrepareConfig(seq_len=64, min_doc_tokens=100, short_keep_prob=0.25, seed=3)
    manifest = prepare([path], tokenizer_dir, tmp_path / "out", cfg)
    src = manifest["sources"]["default"]
    kept_short = src["kept_documents"] - 200
    assert src["documents"] == 800
    assert abs(kept_short / 600 - 0.25) < 0.06  # binomial(600, 0.25): sd 0.018
    again = prepare([path], tokenizer_dir, tmp_path / "out2", cfg)
    assert again["sources"] == manifest["sources"]  # the draws are seeded


def test_grain_worker_processes_give_the_same_shards(tokenizer_dir, tmp_path):
    for i in range(3):
        _jsonl(tmp_path / f"part{i}.jsonl", DOCS[i::3] * 3)
    inputs = [str(tmp_path / "part*.jsonl")]
    cfg = PrepareConfig(seq_len=64, min_doc_tokens=12, short_keep_prob=0.5)
    inline = prepare(inputs, tokenizer_dir, tmp_path / "inline", cfg)
    workers = prepare(inputs, tokenizer_dir, tmp_path / "workers", dataclasses.replace(cfg, workers=2))

    def digest(out):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").iterdir())}

    assert workers["sources"] == inline["sources"]
    assert digest(tmp_path / "workers") == digest(tmp_path / "inline")
