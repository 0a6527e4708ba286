"""Packing: every token comes out exactly once (counted), document boundaries survive the cut,
and the two packing modes give the segment ids, positions and loss weights of the data contract."""

import numpy as np
import pytest

from lwm_jax.data.packing import (
    SequencePacker,
    decode_record,
    encode_record,
    split_inputs_targets,
    to_example,
    with_bos_eos,
)
from lwm_jax.errors import UserError

BOS, EOS = 1000, 1001


def _random_docs(rng, n, max_len):
    lengths = rng.integers(1, max_len, size=n)
    lengths[::7] = max_len * 3  # some documents longer than a sequence
    return [rng.integers(0, 999, size=int(k)).astype(np.int32) for k in lengths]


@pytest.mark.parametrize("seq_len", [1, 16, 63])
def test_packing_keeps_every_token(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = _random_docs(rng, 200, 40)
    packer = SequencePacker(seq_len, pad_id=EOS, with_mask=False)
    records = []
    for chunk in np.array_split(np.arange(len(docs)), 9):  # documents arrive in uneven batches
        tokens, lengths = with_bos_eos(np.concatenate([docs[i] for i in chunk]), [len(docs[i]) for i in chunk],
                                       BOS, EOS)
        records += packer.add(tokens, lengths)
    records += packer.finish()

    stream = np.concatenate([np.concatenate([[BOS], d, [EOS]]) for d in docs])
    decoded = [decode_record(r) for r in records]
    real = np.concatenate([r.tokens[: r.n_real] for r in decoded])
    assert len(real) == len(stream) == packer.tokens_in == packer.tokens_out
    np.testing.assert_array_equal(real, stream)  # nothing lost, duplicated or reordered
    assert all(len(r.tokens) == seq_len + 1 for r in decoded)
    assert sum(r.n_real < seq_len + 1 for r in decoded) <= 1  # only the last one is padded
    assert packer.sequences * (seq_len + 1) == packer.tokens_out + packer.padding
    assert packer.documents == len(docs)

    # Document starts recorded in the sequences are exactly the documents' starts in the stream.
    doc_starts = np.cumsum([len(d) + 2 for d in docs]) - np.array([len(d) + 2 for d in docs])
    found = [i * (seq_len + 1) + s for i, r in enumerate(decoded) for s in r.starts
             if s > 0 or i * (seq_len + 1) in set(doc_starts)]
    np.testing.assert_array_equal(found, doc_starts)


def test_mask_travels_with_tokens():
    packer = SequencePacker(7, pad_id=EOS, with_mask=True)
    tokens = np.arange(20, dtype=np.int32)
    mask = (tokens % 3 == 0).astype(np.uint8)
    records = [decode_record(r) for r in packer.add(tokens, [12, 8], mask) + packer.finish()]
    np.testing.assert_array_equal(np.concatenate([r.mask[: r.n_real] for r in records]), mask)
    assert records[-1].mask[records[-1].n_real:].sum() == 0


def _record(tokens, starts, n_real=None, mask=None):
    tokens = np.asarray(tokens, np.int32)
    n_real = len(tokens) if n_real is None else n_real
    return decode_record(encode_record(tokens, np.asarray(starts, np.int32), n_real, mask))


def test_continuous_mode():
    # A continuation (3 tokens), a document of 4, a document of 2, then 3 padding tokens.
    ex = to_example(_record([7, 8, EOS, BOS, 5, 6, EOS, BOS, EOS, EOS, EOS, EOS], [0, 3, 7], n_real=9), "continuous")
    np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0, 0])
    np.testing.assert_array_equal(ex["positions"], np.arange(12))
    np.testing.assert_array_equal(ex["loss_weights"], [1] * 9 + [0] * 3)
    assert {k: v.dtype for k, v in ex.items()} == {"tokens": np.int32, "segment_ids": np.int32,
                                                   "positions": np.int32, "loss_weights": np.float32}


def test_document_mode():
    ex = to_example(_record([7, 8, EOS, BOS, 5, 6, EOS, BOS, EOS, EOS, EOS, EOS], [0, 3, 7], n_real=9), "document")
    np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0, 0])
    np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1, 2])
    # A document's first token cannot be predicted across the document mask.
    np.testing.assert_array_equal(ex["loss_weights"], [0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0])


def test_chat_mask_becomes_loss_weights():
    mask = np.array([0, 0, 1, 1, 0, 1], np.uint8)
    ex = to_example(_record([BOS, 3, 4, 5, 6, 7], [0], mask=mask), "continuous")
    np.testing.assert_array_equal(ex["loss_weights"], mask)


def test_split_inputs_targets():
    ex = to_example(_record(np.arange(9), [0, 4]), "document")
    batch = {k: np.stack([v, v]) for k, v in ex.items()}
    split = split_inputs_targets(batch)
    assert all(v.shape == (2, 8) for v in split.values())
    np.testing.assert_array_equal(split["targets"][0], np.arange(1, 9))
    np.testing.assert_array_equal(split["loss_weights"][0], ex["loss_weights"][1:])
    np.testing.assert_array_equal(split["positions"][0], ex["positions"][:-1])


def test_bad_record_and_mode_are_user_errors():
    with pytest.raises(UserError, match="not an lwm-jax packed record"):
        decode_record(np.zeros(8, np.int32).tobytes())
    with pytest.raises(UserError, match="packing='bogus'"):
        to_example(_record([1, 2], [0]), "bogus")
