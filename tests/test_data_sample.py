"""`lwm-jax data sample`: a deterministic SlimPajama-format corpus from Python's own sources and an
offline tokenizer with Llama-3's special tokens and chat template, usable end to end by prepare
and the pipeline; and the `data` CLI (help texts, handlers, JSON last line)."""

import argparse
import json

import numpy as np
import pytest
import zstandard

from lwm_jax.cli import data as commands
from lwm_jax.config import DataConfig
from lwm_jax.data.chat import ChatTemplate, encode_chats
from lwm_jax.data.pipeline import build_iterator
from lwm_jax.data.sample import SPECIAL_TOKENS, build_sample, task_tokenizer
from lwm_jax.data.synthetic import niah_sample, passkey_sample
from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info
from lwm_jax.errors import UserError

SMALL = dict(vocab_size=512, max_chars_per_source=120_000)


def _parser():
    parser = argparse.ArgumentParser(prog="lwm-jax")
    commands.register(parser.add_subparsers(dest="command"))
    return parser


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "demo"
    return out, build_sample(out, **SMALL)


def _records(path):
    return [json.loads(line) for line in zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
            .decode().splitlines()]


def test_sample_is_deterministic(sample, tmp_path):
    again = build_sample(tmp_path / "again", **SMALL)
    assert again["files"] == sample[1]["files"]  # same sha256 of every file written


def test_sample_corpus_is_slimpajama_format(sample):
    out, summary = sample
    records = [r for f in sorted((out / "corpus").glob("*.jsonl.zst")) for r in _records(f)]
    assert records and all(set(r) == {"text", "meta"} and r["text"] for r in records)
    names = {r["meta"]["redpajama_set_name"] for r in records}
    assert names == {"stdlib_code", "stdlib_docs", "stdlib_tests"} == set(summary["sources"])
    assert max(len(r["text"]) for r in records) > 50_000  # long documents
    chats = _records(next((out / "chat").glob("*.jsonl.zst")))
    assert chats and all(m["role"] in ("user", "assistant") for c in chats for m in c["messages"])


def test_sample_tokenizer_has_llama3_specials(sample):
    out, summary = sample
    info = load_tokenizer_info(out / "tokenizer")
    assert info.vocab_size == summary["vocab_size"] == SMALL["vocab_size"]
    assert (info.bos_token, info.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert info.bos_id == SMALL["vocab_size"] - len(SPECIAL_TOKENS)  # special ids come last, as in Llama-3
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    template = ChatTemplate(info.chat_template, dict(info.special_tokens))
    assert template.render(messages, add_generation_prompt=True).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert template.render(messages).endswith("hello<|eot_id|>")


def test_sample_prepares_and_trains_end_to_end(sample, tmp_path):
    out, _ = sample
    args = _parser().parse_args(["data", "prepare", str(out / "corpus"), str(out / "chat"), "--tokenizer",
                                 str(out / "tokenizer"), "--out", str(tmp_path / "prepared"), "--seq-len", "256",
                                 "--min-doc-tokens", "2000", "--short-keep-prob", "0.5", "--json"])
    assert args.func(args) == 0
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert set(manifest["sources"]) == {"stdlib_code", "stdlib_docs", "stdlib_tests", "chat"}
    it = build_iterator(DataConfig(paths=(str(tmp_path / "prepared"),), chat_ratio=0.2), seq_len=256,
                        global_batch_size=4, seed=0, process_index=0, process_count=1)
    batch = next(it)
    it.close()
    assert batch["tokens"].shape == (4, 257) and batch["tokens"].max() < SMALL["vocab_size"]
    # This template honours add_generation_prompt: replies are found the same way.
    info = load_tokenizer_info(out / "tokenizer")
    tok = get_tokenizer(info.tokenizer_file)
    chat = _records(next((out / "chat").glob("*.jsonl.zst")))[0]["messages"]
    (ids, mask), = encode_chats(tok, ChatTemplate(info.chat_template, dict(info.special_tokens)), [chat], info.bos_id)
    weighted = tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
    assert weighted == "".join(m["content"].strip() + "<|eot_id|>" for m in chat if m["role"] == "assistant")
    assert np.count_nonzero(mask) < len(ids)


def test_sample_command_prints_json_last(tmp_path, capsys):
    args = _parser().parse_args(["data", "sample", str(tmp_path / "demo"), "--vocab-size", "512",
                                 "--max-chars-per-source", "60000", "--json"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["vocab_size"] == 512 and "stdlib_code" in summary["sources"]
    assert any("lwm-jax data prepare" in line for line in lines[:-1])
    with pytest.raises(UserError, match="not an empty folder"):
        args.func(args)


@pytest.mark.parametrize("argv,words", [
    (["data", "--help"], ["prepare", "sample"]),
    (["data", "prepare", "--help"], ["--tokenizer", "--seq-len", "NAME=PATTERN", "--short-keep-prob", "--json"]),
    (["data", "sample", "--help"], ["OUT_DIR", "tokenizer_config.json", "--vocab-size"]),
])
def test_help(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(argv)
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(w in text for w in words)


def test_task_tokenizer_reads_the_probes_without_unknowns(tmp_path, capsys):
    """`data sample --tokenizer task`: the vocabulary asked for, Llama-3's specials last, every word of
    the passkey and NIAH templates known, numbers in 2-digit tokens (a 5-digit key is 3 tokens)."""
    out = tmp_path / "task"
    args = _parser().parse_args(["data", "sample", str(out), "--tokenizer", "task", "--vocab-size", "512",
                                 "--max-chars-per-source", "60000", "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokenizer"] == "task"
    info = load_tokenizer_info(out / "tokenizer")
    tok = get_tokenizer(info.tokenizer_file)
    assert info.vocab_size == 512 and info.bos_id == 512 - len(SPECIAL_TOKENS)
    unk = tok.token_to_id("<unk>")
    for sample in (passkey_sample(tok, 128, 0.5, 7, bos_id=info.bos_id),
                   niah_sample(tok, 128, 0.5, 7, bos_id=info.bos_id)):  # the default haystack is the filler
        assert unk not in sample.ids.tolist() and len(sample.ids) == 128
        assert "".join(tok.id_to_token(i) for i in sample.answer_ids) == sample.answer
        assert len(sample.answer_ids) == (len(sample.answer) + 1) // 2
    assert tok.encode("x86 is 1234567.", add_special_tokens=False).tokens == ["x", "86", "is", "12", "34", "56",
                                                                               "7", "."]
    assert tok.encode("zzzqqq", add_special_tokens=False).ids == [unk]
    with pytest.raises(UserError, match="too small for the task tokenizer"):
        task_tokenizer(["some text"], 100)
