"""Chat records through the real Llama-3 template: the text matches transformers' rendering, the
ids match its tokenizer, and loss weight 1 falls exactly on the assistant replies and their
<|eot_id|>, also after prepare and the training pipeline."""

import json

import numpy as np
import pytest
import transformers

from lwm_jax.config import DataConfig, PrepareConfig
from lwm_jax.data.chat import ChatTemplate, encode_chats
from lwm_jax.data.pipeline import build_iterator
from lwm_jax.data.prepare import prepare
from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info
from tests.conftest import llama3_tokenizer_dir, require_llama3_tokenizer

EOT = 128009

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "  Name a prime.  "},
     {"role": "assistant", "content": "  7.\n\nAlso 11.  "},
     {"role": "user", "content": "And an even one?"},
     {"role": "assistant", "content": "Two — 2 ✓ (the only one)"}],
    [{"role": "user", "content": "Say <b>hi</b> in JSON"},
     {"role": "assistant", "content": '{"greeting": "hi"}'},
     {"role": "user", "content": "thanks"}],  # a trailing user turn is context only
]


@pytest.fixture(scope="module")
def llama3():
    info = load_tokenizer_info(require_llama3_tokenizer())
    return info, get_tokenizer(info.tokenizer_file), ChatTemplate(info.chat_template, dict(info.special_tokens))


def _weighted_runs(ids, mask):
    runs, current = [], []
    for token, weight in zip(ids, mask):
        if weight:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.fixture(scope="module")
def hf_tokenizer(llama3):
    return transformers.AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir()))


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_rendering_and_ids_match_transformers(llama3, hf_tokenizer, messages):
    info, tok, template = llama3
    hf = hf_tokenizer
    text, _ = template.render_with_spans(messages)
    hf_text = hf.apply_chat_template(messages, tokenize=False)
    # This Llama-3 template appends an assistant header even unasked; training text drops it.
    assert hf_text == text + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    (ids, _), = encode_chats(tok, template, [messages], info.bos_id)
    assert ids.tolist() == hf(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == info.bos_id and (ids == info.bos_id).sum() == 1


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_loss_weight_exactly_on_assistant_replies(llama3, messages):
    info, tok, template = llama3
    (ids, mask), = encode_chats(tok, template, [messages], info.bos_id)
    replies = [m["content"].strip() for m in messages if m["role"] == "assistant"]
    runs = _weighted_runs(ids, mask)
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == [r + "<|eot_id|>" for r in replies]
    assert all(r[-1] == EOT for r in runs)
    # Every unweighted token belongs to headers, BOS, or system/user turns.
    unweighted = tok.decode(ids[mask == 0].tolist(), skip_special_tokens=False)
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"].strip() in unweighted
    assert mask.sum() == sum(len(r) for r in runs)


def test_chat_through_prepare_and_pipeline(llama3, tmp_path):
    info, tok, template = llama3
    records = [{"messages": m} for m in CONVERSATIONS * 4]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = prepare([str(tmp_path / "chat.jsonl")], llama3_tokenizer_dir(), tmp_path / "out",
                       PrepareConfig(seq_len=64))
    assert manifest["sources"]["chat"]["kind"] == "chat"
    assert manifest["sources"]["chat"]["documents"] == len(records)
    it = build_iterator(DataConfig(paths=(str(tmp_path / "out"),), chat_ratio=1.0, shuffle=False, packing="document"),
                        seq_len=64, global_batch_size=1, seed=0, process_index=0, process_count=1)
    n_seq = manifest["sources"]["chat"]["sequences"]
    batches = [next(it) for _ in range(n_seq)]
    tokens = np.concatenate([b["tokens"][0] for b in batches])
    weights = np.concatenate([b["loss_weights"][0] for b in batches])
    real = np.concatenate([b["segment_ids"][0] > 0 for b in batches])
    expected = [encode_chats(tok, template, [r["messages"]], info.bos_id)[0] for r in records]
    np.testing.assert_array_equal(tokens[real], np.concatenate([e[0] for e in expected]))
    # Continuing documents across a sequence cut keeps the weights (index 0 of a row is never a target).
    starts = np.cumsum([b["tokens"].shape[1] for b in batches]) - batches[0]["tokens"].shape[1]
    expected_w = np.concatenate([e[1] for e in expected]).astype(np.float32)
    got_w = weights[real].copy()
    real_index = np.flatnonzero(real)
    row_start = np.isin(real_index, starts)
    np.testing.assert_array_equal(got_w[~row_start], expected_w[~row_start])
    assert weights[~real].sum() == 0
