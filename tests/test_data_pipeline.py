"""The training pipeline over prepared shards: seeded and deterministic, process shares that are
disjoint and cover the data, exact resume (also through orbax and onto another process count),
per-source mixture within 2% of the weights, and global jax Arrays from per-process batches."""

import collections
import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from jax.sharding import NamedSharding, PartitionSpec

from lwm_jax.config import DataConfig, PrepareConfig, from_dict, load_data_config, to_dict
from lwm_jax.data.manifest import load_manifest
from lwm_jax.data.mixture import SLIMPAJAMA_MIXTURE, resolve_weights
from lwm_jax.data.packing import decode_record, split_inputs_targets
from lwm_jax.data.pipeline import build_dataset, build_iterator, make_global_batch
from lwm_jax.data.prepare import prepare
from lwm_jax.errors import UserError
from tests.conftest import require_llama3_tokenizer

SEQ_LEN = 32
MIXTURE_TOL = 0.02  # per-source share of real tokens vs its weight; grain's deterministic mix lands within ~0.2%
SOURCES = ("RedPajamaBook", "RedPajamaC4", "RedPajamaGithub")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared dataset with three SlimPajama sources and a chat source."""
    tokenizer = require_llama3_tokenizer()
    tmp = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(450):
        words = " ".join(f"w{x}" for x in rng.integers(0, 5000, rng.integers(3, 60)))
        lines.append({"text": f"doc {i}: {words}", "meta": {"redpajama_set_name": SOURCES[i % 3]}})
    for i in range(60):
        lines.append({"messages": [{"role": "user", "content": f"question {i}?"},
                                   {"role": "assistant", "content": f"answer {i} " * (i % 5 + 1)}]})
    (tmp / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    manifest = prepare([str(tmp / "raw.jsonl")], tokenizer, tmp / f"prepared-{SEQ_LEN}",
                       PrepareConfig(seq_len=SEQ_LEN, short_keep_prob=1.0))
    return tmp, manifest


def _config(prepared, **kw):
    return DataConfig(paths=(str(prepared[0] / "prepared-{seq_len}"),), **kw)


def _take(config, n, *, batch=8, seed=0, p=0, count=1):
    it = build_iterator(config, seq_len=SEQ_LEN, global_batch_size=batch, seed=seed, process_index=p,
                        process_count=count)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_batches_have_the_contract_shape(prepared):
    (batch,) = _take(_config(prepared), 1)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "tokens": ((8, SEQ_LEN + 1), np.int32), "segment_ids": ((8, SEQ_LEN + 1), np.int32),
        "positions": ((8, SEQ_LEN + 1), np.int32), "loss_weights": ((8, SEQ_LEN + 1), np.float32)}
    assert (batch["segment_ids"][:, 0] == 1).all()


def test_same_seed_same_batches(prepared):
    config = _config(prepared, chat_ratio=0.1)
    assert _equal(_take(config, 6, seed=7), _take(config, 6, seed=7))
    assert not _equal(_take(config, 6, seed=7), _take(config, 6, seed=8))


@pytest.mark.parametrize("count", [2, 4])
def test_process_shares_partition_each_global_batch(prepared, count):
    config = _config(prepared, chat_ratio=0.1)
    whole = _take(config, 5)
    shares = [_take(config, 5, p=p, count=count) for p in range(count)]
    for step in range(5):
        for key in whole[step]:
            joined = np.concatenate([shares[p][step][key] for p in range(count)])
            np.testing.assert_array_equal(joined, whole[step][key])  # disjoint rows, together the batch


def test_shares_cover_every_sequence_once_per_epoch(prepared):
    config = _config(prepared, weights={"RedPajamaBook": 1.0})
    n = prepared[1]["sources"]["RedPajamaBook"]["sequences"]
    steps = -(-n // 4)
    rows = {}
    for p in range(2):
        for step, batch in enumerate(_take(config, steps, batch=4, p=p, count=2)):
            for j, row in enumerate(batch["tokens"]):
                rows[step * 4 + p * 2 + j] = tuple(row)
    first_epoch = [rows[i] for i in range(n)]
    assert len(set(first_epoch)) == n  # no sequence twice

    shard = load_manifest(prepared[0] / f"prepared-{SEQ_LEN}")["sources"]["RedPajamaBook"]["shard_paths"][0]
    reader = ArrayRecordReader(shard)
    stored = {tuple(decode_record(b).tokens) for b in reader.read_all()}
    reader.close()
    assert set(first_epoch) == stored  # and every one of them


@pytest.mark.parametrize("state_form", ["bytes", "str", "dict"])
def test_resume_after_k_batches_equals_the_uninterrupted_stream(prepared, state_form):
    config = _config(prepared, chat_ratio=0.2, packing="document")
    kwargs = dict(seq_len=SEQ_LEN, global_batch_size=8, seed=3, process_index=1, process_count=2)
    it = build_iterator(config, **kwargs)
    for _ in range(3):
        next(it)
    state = it.get_state()
    uninterrupted = [next(it) for _ in range(5)]
    it.close()
    state = {"bytes": state, "str": state.decode(), "dict": json.loads(state)}[state_form]
    resumed = build_iterator(config, **kwargs)
    resumed.set_state(state)
    assert _equal([next(resumed) for _ in range(5)], uninterrupted)
    resumed.close()


def test_resume_onto_another_process_count(prepared):
    config = _config(prepared)
    it = build_iterator(config, seq_len=SEQ_LEN, global_batch_size=8, seed=0, process_index=0, process_count=2)
    for _ in range(4):
        next(it)
    state = it.get_state()
    it.close()
    single = build_iterator(config, seq_len=SEQ_LEN, global_batch_size=8, seed=0, process_index=0, process_count=1)
    single.set_state(state)
    assert _equal([next(single)], _take(config, 5)[4:])  # global batch 4 of the same stream
    single.close()


def test_state_of_another_pipeline_is_refused(prepared):
    it = build_iterator(_config(prepared), seq_len=SEQ_LEN, global_batch_size=8, seed=0, process_index=0,
                        process_count=1)
    state = it.get_state()
    other = build_iterator(_config(prepared), seq_len=SEQ_LEN, global_batch_size=8, seed=1, process_index=0,
                           process_count=1)
    with pytest.raises(UserError, match="seed: saved 0, now 1"):
        other.set_state(state)
    it.close()
    other.close()


def test_orbax_checkpoint_roundtrip(prepared, tmp_path):
    config = _config(prepared, chat_ratio=0.1)
    kwargs = dict(seq_len=SEQ_LEN, global_batch_size=4, seed=0, process_index=0, process_count=1)
    it = build_iterator(config, **kwargs)
    for _ in range(2):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    it.close()
    restored = build_iterator(config, **kwargs)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert _equal([next(restored) for _ in range(3)], expected)
    restored.close()


def _source_shares(config, prepared, n_batches=150):
    ds, fingerprint = build_dataset(config, seq_len=SEQ_LEN, global_batch_size=16, seed=0, process_index=0,
                                    process_count=1, with_source=True)
    names = sorted(fingerprint["sources"])
    tokens = collections.Counter()
    it = iter(ds)
    for _ in range(n_batches):
        batch = next(it)
        real = (batch["segment_ids"] > 0).sum(axis=1)
        for source, count in zip(batch["source"], real):
            tokens[names[source]] += int(count)
    total = sum(tokens.values())
    return {n: tokens[n] / total for n in names}


@pytest.mark.parametrize("weights,chat_ratio", [
    ({"RedPajamaBook": 0.6, "RedPajamaC4": 0.3, "RedPajamaGithub": 0.1}, 0.0),
    (None, 0.0),  # SlimPajama's published mixture, renormalised over the present sources
    ({"RedPajamaBook": 1.0, "RedPajamaC4": 1.0, "RedPajamaGithub": 2.0}, 0.25),
])
def test_mixture_within_two_percent(prepared, weights, chat_ratio):
    shares = _source_shares(_config(prepared, weights=weights, chat_ratio=chat_ratio), prepared)
    base = weights or {n: SLIMPAJAMA_MIXTURE[n] for n in SOURCES}
    expected = {n: (1 - chat_ratio) * w / sum(base.values()) for n, w in base.items()}
    if chat_ratio:
        expected["chat"] = chat_ratio
    assert set(shares) == set(expected)
    for name, share in shares.items():
        assert abs(share - expected[name]) <= MIXTURE_TOL, (name, share, expected[name])


def test_document_mode_restarts_positions(prepared):
    (batch,) = _take(_config(prepared, packing="document"), 1)
    seg, pos, w = batch["segment_ids"], batch["positions"], batch["loss_weights"]
    new_doc = np.diff(seg, axis=1) != 0
    np.testing.assert_array_equal(pos[:, 1:][new_doc], 0)
    np.testing.assert_array_equal(w[:, 1:][new_doc], 0)
    assert (np.diff(pos, axis=1)[~new_doc] == 1).all()
    (cont,) = _take(_config(prepared, packing="continuous"), 1)
    np.testing.assert_array_equal(cont["positions"], np.tile(np.arange(SEQ_LEN + 1), (8, 1)))
    np.testing.assert_array_equal(cont["tokens"], batch["tokens"])


def test_pipeline_errors_are_user_errors(prepared, tmp_path):
    def build(config, **kw):
        args = dict(seq_len=SEQ_LEN, global_batch_size=8, seed=0, process_index=0, process_count=1) | kw
        return build_iterator(config, **args)

    with pytest.raises(UserError, match="seq_len=32 but training uses seq_len=64"):
        build(DataConfig(paths=(str(prepared[0] / f"prepared-{SEQ_LEN}"),)), seq_len=64)
    with pytest.raises(UserError, match="does not exist"):
        build(DataConfig(paths=(str(tmp_path / "nothing"),)))
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        build(DataConfig(paths=(str(tmp_path / "half"),)))
    with pytest.raises(UserError, match="unknown source"):
        build(_config(prepared, weights={"RedPajamaArXiv": 1.0}))
    with pytest.raises(UserError, match="divisible"):
        build(_config(prepared), global_batch_size=6, process_count=4)
    with pytest.raises(UserError, match="packing='zigzag'"):
        DataConfig(paths=("x",), packing="zigzag")
    with pytest.raises(UserError, match="chat_ratio=1.5"):
        DataConfig(paths=("x",), chat_ratio=1.5)


def test_data_config_from_yaml(tmp_path):
    (tmp_path / "recipe.yaml").write_text("data:\n  paths: data/sp-{seq_len}\n  weights: {RedPajamaBook: 2}\n"
                                          "  packing: document\n")
    config = load_data_config(tmp_path / "recipe.yaml", ["data.chat_ratio=0.1"])
    assert config.paths == ("data/sp-{seq_len}",) and config.weights == {"RedPajamaBook": 2.0}
    assert config.document_mask and config.chat_ratio == 0.1
    assert [str(p) for p in config.resolved_paths(65536)] == ["data/sp-65536"]

    assert from_dict(DataConfig, to_dict(config)) == config and hash(config) == hash(config.replace())
    (tmp_path / "bad.yaml").write_text("paths: [a]\nshuffle_buffer: 3\n")
    with pytest.raises(UserError, match="unknown config key"):
        load_data_config(tmp_path / "bad.yaml")


def test_make_global_batch(prepared):
    mesh = jax.make_mesh((2, 2, 2, 1), ("dp", "fsdp", "sp", "tp"))
    (local,) = _take(_config(prepared), 1)
    rows = NamedSharding(mesh, PartitionSpec(("dp", "fsdp")))
    full = make_global_batch(local, rows)
    assert full["tokens"].shape == (8, SEQ_LEN + 1)
    np.testing.assert_array_equal(np.asarray(full["tokens"]), local["tokens"])
    seq = NamedSharding(mesh, PartitionSpec(("dp", "fsdp"), "sp"))
    split = make_global_batch(split_inputs_targets(local), seq, global_batch_size=8)
    assert split["inputs"].sharding == seq and split["inputs"].shape == (8, SEQ_LEN)
    np.testing.assert_array_equal(np.asarray(split["targets"]), local["tokens"][:, 1:])
    np.testing.assert_array_equal(np.asarray(split["loss_weights"]), local["loss_weights"][:, 1:])


def test_resolve_weights_rules():
    def src(kind, tokens):
        return {"kind": kind, "kept_tokens": tokens, "sequences": 1}

    # Sources outside SlimPajama's table: natural token shares.
    w = resolve_weights({"code": src("text", 300), "docs": src("text", 100)}, None, 0.0)
    assert w == pytest.approx({"code": 0.75, "docs": 0.25})
    # SlimPajama sources: the published mixture, renormalised over the present ones.
    w = resolve_weights({"RedPajamaBook": src("text", 1), "RedPajamaArXiv": src("text", 10**6),
                         "chat": src("chat", 5)}, None, 0.1)
    assert w == pytest.approx({"RedPajamaBook": 0.9 * 0.042 / 0.088, "RedPajamaArXiv": 0.9 * 0.046 / 0.088,
                               "chat": 0.1})
    assert "chat" not in resolve_weights({"a": src("text", 1), "chat": src("chat", 1)}, None, 0.0)
    with pytest.raises(UserError, match="no chat source"):
        resolve_weights({"a": src("text", 1)}, None, 0.5)
    with pytest.raises(UserError, match="chat_ratio instead"):
        resolve_weights({"a": src("text", 1), "chat": src("chat", 1)}, {"chat": 1.0}, 0.0)
    with pytest.raises(UserError, match="below 1e-06"):
        resolve_weights({"a": src("text", 1), "b": src("text", 1)}, {"a": 1.0, "b": 1e-9}, 0.0)
