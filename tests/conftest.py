"""Test session setup: 8 simulated CPU devices (set before JAX starts), the compiler settings and
compilation cache shared by the session's processes (pytest-xdist workers and the CLI tests'
subprocesses), and tiny HF model factories."""

import os
import shutil
import tempfile

# Compiling, not running, dominates the suite: its models are tiny, so the LLVM back end's
# optimisations (at level 0, without the expensive passes) cost more than they save. They change
# nothing of the IEEE float semantics XLA asks LLVM for.
_TEST_XLA_FLAGS = ["--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
                   "--xla_llvm_disable_expensive_passes=true"]
_OURS = {f.split("=")[0] for f in _TEST_XLA_FLAGS}
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=")[0] not in _OURS] + _TEST_XLA_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The workers and the CLI tests' subprocesses (a run, its resume, a rerun) compile the same programs
# again: a persistent cache, made by the first process of the session (the xdist controller, or
# pytest alone) and inherited by every process it starts, which find it in the environment.
_OWNER = "LWM_JAX_TEST_XLA_CACHE" not in os.environ
if _OWNER:
    os.environ["LWM_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="lwm-jax-test-xla-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["LWM_JAX_TEST_XLA_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
# Progress lines in a log file come every 30 s of long work; on busy test machines a short command
# can take that long and print one before its error line. Tests that read progress lines force them.
os.environ.setdefault("LWM_JAX_LOG_EVERY_S", "3600")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def llama3_tokenizer_dir() -> Path:
    """The real Llama-3 tokenizer folder (env LWM_LLAMA3_TOKENIZER wins)."""
    return Path(os.environ.get("LWM_LLAMA3_TOKENIZER", ROOT.parent / "shared" / "llama3-tokenizer"))


def require_llama3_tokenizer() -> Path:
    """The Llama-3 tokenizer folder; the calling test fails, naming the path, when a checkout has
    none beside it (a missing fixture is a setup error to fix, not a reason to skip)."""
    path = llama3_tokenizer_dir()
    if not (path / "tokenizer.json").is_file():
        pytest.fail(f"Llama-3 tokenizer not found at {path}: put it there or set LWM_LLAMA3_TOKENIZER")
    return path


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """`(tokenizers.Tokenizer, TokenizerInfo)` of the real Llama-3 tokenizer."""
    from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info

    info = load_tokenizer_info(require_llama3_tokenizer())
    return get_tokenizer(info.tokenizer_file), info


def make_hf_llama(out_dir: Path, *, seed: int = 0, vocab_size: int = 256, hidden_size: int = 64,
                  intermediate_size: int = 160, num_layers: int = 2, num_heads: int = 4,
                  num_kv_heads: int = 1, tie: bool = False, rope_theta: float = 500_000.0,
                  rope_scaling: dict | None = None, max_position_embeddings: int = 8192):
    """Saves a random `transformers.LlamaForCausalLM` (float32) to `out_dir`; returns the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads, rms_norm_eps=1e-5, rope_theta=rope_theta,
        rope_scaling=rope_scaling, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, initializer_range=0.1,
        attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights so a swapped norm cannot pass
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return model


@pytest.fixture
def hf_llama(tmp_path):
    """A factory: `hf_llama(**kwargs) -> (hf_dir, torch_model)`."""
    counter = iter(range(1000))

    def make(**kwargs):
        out = tmp_path / f"hf{next(counter)}"
        return out, make_hf_llama(out, **kwargs)

    return make


def cli_error(capsys, argv) -> str:
    """Runs `lwm-jax ARGV` in-process, asserts exit 2 with one stderr line and no traceback; returns it."""
    from lwm_jax.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def blind_logits(vocab: int, rows: int = 64):
    """A `logits_fn` whose argmax is random per row: it knows nothing of the prompt."""
    import numpy as np

    rng = np.random.default_rng(0)

    def logits_fn(ids):
        logits = np.zeros((rows, vocab), np.float32)
        logits[np.arange(rows), rng.integers(vocab, size=rows)] = 1.0
        return logits
    return logits_fn


def pytest_sessionfinish(session, exitstatus):
    if _OWNER:
        shutil.rmtree(os.environ["LWM_JAX_TEST_XLA_CACHE"], ignore_errors=True)
