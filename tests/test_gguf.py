"""GGUF export checked by llama.cpp (llama-cpp-python): token ids, logits, metadata, and bad input.

Logits are compared with llama.cpp's KV cache in float32: its default float16 cache alone moves
logits by ~4e-3, which would hide an f32 export's error (~1e-6) behind the cache's.
"""

import json
import types
from unittest import mock

import jax
import jax.numpy as jnp
import llama_cpp
import llama_cpp.llama_cpp as llama_cpp_api
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
from flax import nnx
from llama_cpp import Llama as LlamaCpp
from tokenizers import Tokenizer

from lwm_jax.cli import main
from lwm_jax.config import ModelConfig
from lwm_jax.convert import gguf as gguf_export
from lwm_jax.errors import UserError
from lwm_jax.model.llama import Llama
from lwm_jax.model.opened import open_checkpoint
from tests.conftest import llama3_tokenizer_dir, make_hf_llama

F32_LOGIT_TOL = 1e-3  # max |llama.cpp - ours| over the prompt's logits
F16_LOGIT_TOL = 2e-2
Q8_0_TOP1_MIN = 0.95  # share of prompt positions whose top-1 token agrees
LLAMA3_VOCAB = 128_256
THETA = 3_580_165_449.0  # Gradient's 1048K-stage rope theta
CONTEXT = 1_048_576  # the checkpoint's max_position_embeddings
N_CTX = 128  # llama.cpp's working context for the checks
FIT_STEPS, FIT_LR = 30, 0.5  # SGD steps fitting the random model's head to the prompt (`_fit_head`)
GGML_TYPE_F32 = 0
TYPES = ("f32", "f16", "q8_0")
SAMPLES = [
    "Hello, world! This is a plain ASCII sentence.",
    "Grüße aus Zürich: naïve café, 東京タワー, Ελληνικά, 🦙🚀 and 😶‍🌫️ joined emoji",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tprint(fib(10))  # tab\n",
    "3.14159 42 1234567 1,000,000 -17 0x1F 2^20 = 1048576",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL   spaces  \n\n\n end",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>",
]
PROMPT = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhere is the passkey hidden in "
          "this 1,048,576-token haystack? Answer in one word.<|eot_id|><|start_header_id|>assistant"
          "<|end_header_id|>\n\n")


def _tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(llama3_tokenizer_dir() / "tokenizer.json"))


def _plain_cpu_params():
    """llama.cpp's default model params with `use_extra_bufts` off: no weight repacking into extra
    buffer types, so the oracle runs the plain CPU kernels on every machine. On AMX Xeons the q8_0
    repack fills an AMX tile configuration that GCC 12 builds drop the writes of, and the first
    `ldtilecfg` faults (llama.cpp issue #20824); `Llama()` has no argument for the field."""
    params = _DEFAULT_MODEL_PARAMS()
    params.use_extra_bufts = False
    return params


_DEFAULT_MODEL_PARAMS = llama_cpp_api.llama_model_default_params


def _llama_cpp(path, **kwargs) -> LlamaCpp:
    with mock.patch.object(llama_cpp_api, "llama_model_default_params", _plain_cpu_params):
        return LlamaCpp(model_path=str(path), n_ctx=N_CTX, n_threads=2, verbose=False, **kwargs)


def _llama_cpp_logits(path, tokens) -> np.ndarray:
    llm = _llama_cpp(path, logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def _ours(ckpt, tokens) -> np.ndarray:
    model = open_checkpoint(ckpt).model()
    return np.asarray(model(jnp.asarray([tokens], jnp.int32)))[0]


def _fit_head(hf_dir, hf_model, tokens: list[int]) -> None:
    """Refits the saved model's `lm_head` by FIT_STEPS gradient steps to predict `tokens`.

    A random model's top tokens over a 128,256 vocab are near ties (median top-1/top-2 gap ~0.1
    for logits of std ~0.8), so q8_0's rounding alone flips 3-10% of them, even in our own model.
    With its head fitted to the prompt the model is as decisive there as a trained one is on text,
    which is what the q8_0 top-1 check is meant to measure. Plain SGD moves the rows of the
    prompt's tokens and leaves the rest of the head (and the logits' spread) as they were.
    """
    with torch.no_grad():  # final-norm hidden states [seq - 1, embed]
        hidden = jnp.asarray(hf_model.model(torch.as_tensor([tokens[:-1]])).last_hidden_state[0].numpy())
    targets, tx = jnp.asarray(tokens[1:]), optax.sgd(FIT_LR)

    def loss(w):  # w: [vocab, embed], HF layout
        return optax.softmax_cross_entropy_with_integer_labels(hidden @ w.T, targets).mean()

    @jax.jit
    def step(w, opt_state):
        updates, opt_state = tx.update(jax.grad(loss)(w), opt_state, w)
        return optax.apply_updates(w, updates), opt_state

    path = hf_dir / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    w = jnp.asarray(tensors["lm_head.weight"])
    opt_state = tx.init(w)
    for _ in range(FIT_STEPS):
        w, opt_state = step(w, opt_state)
    tensors["lm_head.weight"] = np.asarray(w)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def _export(ckpt, out, *extra) -> int:
    return main(["export-gguf", str(ckpt), str(out), "--tokenizer", str(llama3_tokenizer_dir()), *extra])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny model with the Llama-3 vocab and its head fitted to the prompt, imported,
    exported at every type, and our logits on the prompt."""
    root = tmp_path_factory.mktemp("gguf")
    hf_model = make_hf_llama(root / "hf", vocab_size=LLAMA3_VOCAB, num_kv_heads=2, rope_theta=THETA,
                             max_position_embeddings=CONTEXT)
    tokens = _tokenizer().encode(PROMPT).ids
    assert len(tokens) >= 16
    _fit_head(root / "hf", hf_model, tokens)
    ckpt = root / "ckpt"
    assert main(["import-hf", str(root / "hf"), str(ckpt)]) == 0
    files = {t: root / f"tiny-{t}.gguf" for t in TYPES}
    for t, path in files.items():
        assert _export(ckpt, path, "--type", t) == 0
    return types.SimpleNamespace(root=root, ckpt=ckpt, files=files, tokens=tokens, ours=_ours(ckpt, tokens))


def test_llama_cpp_tokenizes_like_tokenizers(exported):
    llm = _llama_cpp(exported.files["f16"], vocab_only=True)
    tokenizer = _tokenizer()
    for text in SAMPLES:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text).ids, text
    assert llm.tokenize(b"Hi", add_bos=True)[0] == 128_000  # Llama-3 prompts start with BOS
    assert (llm.token_bos(), llm.token_eos()) == (128_000, 128_001)


def test_oracle_runs_llama_cpp_plain_cpu_kernels(exported):
    # Without this the q8_0 oracle segfaults on AMX machines (see `_plain_cpu_params`).
    llm = _llama_cpp(exported.files["q8_0"])
    assert llm.model_params.use_extra_bufts is False
    assert llama_cpp_api.llama_model_default_params().use_extra_bufts is True  # the patch did not leak


@pytest.mark.parametrize("type", TYPES)
def test_llama_cpp_logits_match_ours(exported, type):
    theirs = _llama_cpp_logits(exported.files[type], exported.tokens)
    ours = exported.ours
    diff = float(np.abs(theirs - ours).max())
    top1 = float(np.mean(theirs.argmax(-1) == ours.argmax(-1)))
    print(f"{type}: max |logit diff| {diff:.2e}, top-1 agreement {top1:.3f} over {len(ours)} positions")
    if type == "f32":
        assert diff <= F32_LOGIT_TOL
    elif type == "f16":
        assert diff <= F16_LOGIT_TOL
    else:
        assert top1 >= Q8_0_TOP1_MIN


def test_llama_cpp_reads_context_length_rope_base_and_tokenizer_metadata(exported):
    llm = _llama_cpp(exported.files["f32"])  # hyperparameters are not read with vocab_only
    meta = llm.metadata
    assert llama_cpp.llama_model_n_ctx_train(llm.model) == CONTEXT
    assert np.float32(meta["llama.rope.freq_base"]) == np.float32(THETA)  # GGUF stores float32
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert int(meta["tokenizer.ggml.eot_token_id"]) == 128_009
    config = json.loads((llama3_tokenizer_dir() / "tokenizer_config.json").read_text())
    assert meta["tokenizer.chat_template"] == config["chat_template"]
    for t in TYPES:
        file_type = _llama_cpp(exported.files[t], vocab_only=True).metadata["general.file_type"]
        assert int(file_type) == gguf_export.FILE_TYPES[t]


def test_llama3_rope_scaling_and_tied_embeddings(tmp_path):
    # original_max_position_embeddings=16 makes the rope factors (llama.cpp's rope_freqs tensor)
    # matter within a short prompt: without them the logits move by ~2.8.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    make_hf_llama(tmp_path / "hf", vocab_size=LLAMA3_VOCAB, num_kv_heads=2, tie=True, rope_scaling=scaling)
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    out = tmp_path / "scaled.gguf"
    assert _export(tmp_path / "ckpt", out, "--type", "f32") == 0
    tokens = _tokenizer().encode(PROMPT).ids
    diff = np.abs(_llama_cpp_logits(out, tokens) - _ours(tmp_path / "ckpt", tokens)).max()
    print(f"llama3 rope scaling, tied, f32: max |logit diff| {diff:.2e}")
    assert diff <= F32_LOGIT_TOL


# Bad input ---------------------------------------------------------------------------------------


def test_tokenizer_vocab_must_match_the_model(tmp_path, hf_llama, capsys):
    hf_dir, _ = hf_llama()  # vocab 256
    assert main(["import-hf", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    assert _export(tmp_path / "ckpt", tmp_path / "m.gguf") == 2
    err = capsys.readouterr().err
    assert "has 128,256 tokens but the model's vocab_size is 256" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_type_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _export(tmp_path / "ckpt", tmp_path / "m.gguf", "--type", "q4_k")
    assert exit_info.value.code == 2 and "invalid choice: 'q4_k'" in capsys.readouterr().err
    config = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=16, bos_token_id=0, eos_token_id=(1,))
    model = nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0)))  # abstract: refused before any weight is read
    with pytest.raises(UserError, match=r"--type 'q4_k' is not one of f32, f16, q8_0"):
        gguf_export.export_gguf(model, tmp_path / "m.gguf", llama3_tokenizer_dir(), type="q4_k")
    assert not (tmp_path / "m.gguf").exists()


def test_existing_output_needs_force(exported, tmp_path, capsys):
    out = tmp_path / exported.files["q8_0"].name  # same name: the GGUF's general.name is the file's stem
    out.write_bytes(b"keep")
    assert _export(exported.ckpt, out, "--type", "q8_0") == 2
    assert "already exists; choose a new file or pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep"
    assert _export(exported.ckpt, out, "--type", "q8_0", "--force", "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["path"] == str(out) and result["context_length"] == CONTEXT
    assert out.read_bytes() == exported.files["q8_0"].read_bytes()  # exports are deterministic


def test_failed_export_leaves_existing_file_and_no_partial_file(exported, tmp_path, monkeypatch):
    real = gguf_export.hf_tensors

    def failing(model):
        for i, item in enumerate(real(model)):
            if i == 3:
                raise RuntimeError("disk full")
            yield item

    monkeypatch.setattr(gguf_export, "hf_tensors", failing)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    model = open_checkpoint(exported.ckpt).model()
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_export.export_gguf(model, out, llama3_tokenizer_dir(), type="f16", force=True)
    assert out.read_bytes() == b"keep" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# q8_0 of matrices whose rows are not whole 32-value blocks ----------------------------------------------


def _llama3_vocab_model(tmp_path, hidden_size: int, intermediate_size: int, head_dim: int):
    from lwm_jax.model.store import model_metadata, save_model

    config = ModelConfig(vocab_size=LLAMA3_VOCAB, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_layers=2, num_heads=hidden_size // head_dim, num_kv_heads=1, head_dim=head_dim,
                         bos_token_id=128_000, eos_token_id=(128_001,))
    model = Llama(config, nnx.Rngs(0))
    return save_model(tmp_path / "ckpt", model, model_metadata(config)), model


def test_q8_0_keeps_f16_only_where_rows_are_not_whole_blocks_and_says_so(tmp_path, capsys):
    """intermediate_size 80: ffn_down's rows hold 80 values, not whole 32-value Q8_0 blocks. Those
    matrices stay F16 (as llama.cpp's quantizer leaves them), every other matrix is Q8_0, the file
    type says mostly Q8_0 (true), the summary names the F16 ones, and llama.cpp runs the file."""
    import gguf

    ckpt, model = _llama3_vocab_model(tmp_path, hidden_size=32, intermediate_size=80, head_dim=16)
    out = tmp_path / "m.gguf"
    capsys.readouterr()
    assert _export(ckpt, out, "--type", "q8_0") == 0
    printed = capsys.readouterr().out
    assert "stayed F16 (rows of 80 values are not whole 32-value Q8_0 blocks): blk.*.ffn_down.weight" in printed
    plan = gguf_export._plan(model.config, "q8_0")  # what the summary's (and --json's) f16_fallbacks hold
    assert gguf_export.q8_0_fallbacks(plan, "q8_0") == {"blk.*.ffn_down.weight": 80}

    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    matrices = {name: t.tensor_type.name for name, t in tensors.items() if len(t.shape) > 1}
    assert {n for n, kind in matrices.items() if kind != "Q8_0"} == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert matrices["blk.0.ffn_down.weight"] == "F16"
    hf = dict(gguf_export.hf_tensors(model))
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.ffn_down.weight"].data),
                                  hf["model.layers.1.mlp.down_proj.weight"].astype(np.float16))
    llm = _llama_cpp(out, vocab_only=True)
    assert int(llm.metadata["general.file_type"]) == gguf_export.FILE_TYPES["q8_0"]

    tokens = _tokenizer().encode(PROMPT).ids
    theirs, ours = _llama_cpp_logits(out, tokens), _ours(ckpt, tokens)
    assert np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] > 0.999


def test_q8_0_of_a_model_with_no_quantizable_matrix_is_refused(tmp_path):
    """hidden_size 48 and intermediate_size 80: no matrix has rows of whole 32-value blocks, so a
    q8_0 file would hold no Q8_0 tensor; refused before any weight is read, naming the row lengths."""
    config = ModelConfig(vocab_size=LLAMA3_VOCAB, hidden_size=48, intermediate_size=80, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=24, bos_token_id=128_000, eos_token_id=(128_001,))
    model = nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0)))  # abstract: nothing to read
    with pytest.raises(UserError, match=r"no matrix of this model can be Q8_0 \(their rows hold 48, 80 values"):
        gguf_export.export_gguf(model, tmp_path / "m.gguf", llama3_tokenizer_dir(), type="q8_0")
    assert list(tmp_path.iterdir()) == []
