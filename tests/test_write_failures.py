"""Writes that fail and outputs that cannot be written, for every writer: a disk-full stand-in (a
file-size limit, `ulimit -f`, in a subprocess; or a writer that fails part-way, by monkeypatch) and
unwritable paths (a file used as a folder, a place under /proc). Each ends in one `lwm-jax: error:`
line with exit code 2, never hangs, leaves the destination folder as it was, and the rerun with a
good destination works."""

import errno
import importlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lwm_jax.cli import main
from tests.conftest import ROOT, llama3_tokenizer_dir

LIMIT_KB = 100  # `ulimit -f` of the subprocess runs (bash counts 1 KiB blocks); each output there is larger
HANG_S = 60  # a failed write must end well within this (export-hf used to hang forever)
VOCAB = 512  # the sample tokenizer's vocabulary


def _listing(folder: Path) -> list[str]:
    """Everything under `folder` (hidden names too), as relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("lwm-jax: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    assert not any(noise in err for noise in ("ERROR:", "WARNING:")), err  # orbax's log of its threads, ...
    return errors[0]


def _fails(capsys, argv: list[str]) -> str:
    """Runs `lwm-jax ARGV` in-process; asserts exit 2 and one error line (after any progress lines)."""
    capsys.readouterr()
    assert main(argv) == 2
    return _one_error_line(capsys.readouterr().err)


def _limited(*argv: str) -> str:
    """Runs `lwm-jax ARGV` under `ulimit -f LIMIT_KB`; asserts exit 2 within HANG_S; returns the error line."""
    command = f"ulimit -f {LIMIT_KB}; exec {shlex.quote(sys.executable)} -m lwm_jax.cli {shlex.join(argv)}"
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}  # the cache's own writes would meet the limit
    start = time.monotonic()
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=HANG_S, env=env)
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - start < HANG_S
    return _one_error_line(proc.stderr)


def _failing_after(real, calls: int):
    """`real` that, from call number `calls` on, writes part of its output file and runs out of space."""
    seen = {"n": 0}

    def write(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] < calls:
            return real(*args, **kwargs)
        path = next(a for a in (*args, *kwargs.values()) if isinstance(a, (str, Path)) and "/" in str(a))
        Path(path).write_bytes(b"\0" * 100)  # the write got this far
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


# Fixtures: a tiny checkpoint, its HF export, a Llama-3-vocab checkpoint, the sample corpus ------------


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("writes")


@pytest.fixture(scope="module")
def ckpt(root):
    """A random model of the sample tokenizer's vocab, about 180 KB in bfloat16 (> LIMIT_KB)."""
    from flax import nnx

    from lwm_jax.config import ModelConfig
    from lwm_jax.model.llama import Llama
    from lwm_jax.model.store import model_metadata, save_model

    config = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=32, max_position_embeddings=256, remat="none",
                         attention="blockwise", attention_block_size=32, bos_token_id=VOCAB - 5,
                         eos_token_id=(VOCAB - 4,))
    return save_model(root / "ckpt", Llama(config, nnx.Rngs(0)), model_metadata(config))


@pytest.fixture(scope="module")
def hf_dir(root, ckpt):
    assert main(["export-hf", str(ckpt), str(root / "hf"), "--dtype", "float32"]) == 0
    return root / "hf"


@pytest.fixture(scope="module")
def llama3_ckpt(root):
    """A random model with the Llama-3 vocab (for GGUF export with the Llama-3 tokenizer)."""
    from flax import nnx

    from lwm_jax.config import ModelConfig
    from lwm_jax.model.llama import Llama
    from lwm_jax.model.store import model_metadata, save_model

    config = ModelConfig(vocab_size=128_256, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8, bos_token_id=128_000, eos_token_id=(128_001,))
    return save_model(root / "llama3", Llama(config, nnx.Rngs(0)), model_metadata(config))


@pytest.fixture(scope="module")
def sample(root):
    """The sample corpus and tokenizer (vocab VOCAB), prepared at seq_len 64, and a haystack text."""
    from lwm_jax.config import PrepareConfig
    from lwm_jax.data.prepare import prepare
    from lwm_jax.data.sample import build_sample

    build_sample(root / "sample", vocab_size=VOCAB, max_chars_per_source=20_000)
    prepare([str(root / "sample" / "corpus")], root / "sample" / "tokenizer", root / "prep-64",
            PrepareConfig(seq_len=64, min_doc_tokens=0))
    (root / "haystack.txt").write_text("The grass is green. The sky is blue. " * 400)
    return root / "sample"


# Disk full: a file-size limit in a subprocess -------------------------------------------------------------


def test_export_hf_under_a_file_size_limit_is_one_line_and_the_rerun_works(root, ckpt):
    dest = root / "export-hf"
    dest.mkdir()
    err = _limited("export-hf", str(ckpt), str(dest / "hf"))
    assert err == f"lwm-jax: error: writing {dest / 'hf' / 'model.safetensors'} failed: File too large"
    assert _listing(dest) == []  # no model.safetensors.partial, no temporary folder
    assert main(["export-hf", str(ckpt), str(dest / "hf")]) == 0  # not refused as "exists and is not empty"
    assert (dest / "hf" / "model.safetensors").stat().st_size > LIMIT_KB * 1024


def test_import_hf_under_a_file_size_limit_is_one_line_and_the_rerun_works(root, hf_dir):
    from lwm_jax.model.store import read_metadata

    dest = root / "import-hf"
    dest.mkdir()
    err = _limited("import-hf", str(hf_dir), str(dest / "ckpt"))
    assert err == f"lwm-jax: error: writing {dest / 'ckpt'} failed: File too large"
    assert _listing(dest) == []  # no *.orbax-checkpoint-tmp
    assert main(["import-hf", str(hf_dir), str(dest / "ckpt")]) == 0
    assert read_metadata(dest / "ckpt")["model"]["vocab_size"] == VOCAB


def test_export_gguf_under_a_file_size_limit_is_one_line_and_the_rerun_works(root, llama3_ckpt):
    dest = root / "export-gguf"
    dest.mkdir()
    tokenizer = str(llama3_tokenizer_dir())
    err = _limited("export-gguf", str(llama3_ckpt), str(dest / "m.gguf"), "--tokenizer", tokenizer)
    assert err == f"lwm-jax: error: writing {dest / 'm.gguf'} failed: File too large"
    assert _listing(dest) == []
    assert main(["export-gguf", str(llama3_ckpt), str(dest / "m.gguf"), "--tokenizer", tokenizer]) == 0
    assert _listing(dest) == ["m.gguf"]


# Disk full: a writer that fails part-way ------------------------------------------------------------------


class _FullDiskShards:
    """array_record's writer on a disk that fills up at the 20th record (its error, as it words it)."""

    def __init__(self, path, options):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path, self.records, self.writer = path, 0, ArrayRecordWriter(path, options)

    def write(self, record):
        self.records += 1
        if self.records == 20:
            raise RuntimeError(f"write() failed: No space left on device; writing {self.path}; at byte 4096")
        self.writer.write(record)

    def close(self):
        self.writer.close()


def test_data_prepare_disk_full_leaves_no_shards(root, sample, monkeypatch, capsys):
    from lwm_jax.data import prepare

    dest = root / "prepare-full"
    dest.mkdir()
    argv = ["data", "prepare", str(sample / "corpus"), "--tokenizer", str(sample / "tokenizer"),
            "--out", str(dest / "prep"), "--seq-len", "64"]
    monkeypatch.setattr(prepare, "ArrayRecordWriter", _FullDiskShards)
    assert _fails(capsys, argv) == f"lwm-jax: error: writing {dest / 'prep'} failed: No space left on device"
    assert _listing(dest) == []
    monkeypatch.undo()
    assert main(argv) == 0 and (dest / "prep" / "manifest.json").is_file()


def test_data_sample_disk_full_leaves_nothing(root, monkeypatch, capsys):
    from lwm_jax.data import sample

    dest = root / "sample-full"
    dest.mkdir()
    argv = ["data", "sample", str(dest / "demo"), "--vocab-size", str(VOCAB), "--max-chars-per-source", "20000"]
    monkeypatch.setattr(sample, "_write_jsonl_zst", _failing_after(sample._write_jsonl_zst, calls=3))
    err = _fails(capsys, argv)
    assert err.startswith(f"lwm-jax: error: writing {dest / 'demo'}") and err.endswith("No space left on device")
    assert _listing(dest) == []
    monkeypatch.undo()
    assert main(argv) == 0 and (dest / "demo" / "sample.json").is_file()


def _eval_argv(command: str, ckpt: Path, sample: Path, out: Path) -> list[str]:
    root = sample.parent
    if command == "ppl":
        return ["eval", "ppl", str(ckpt), "--data", str(root / "prep-64"), "--seq-len", "64", "--num-sequences", "2",
                "--out", str(out)]
    if command == "theta-sweep":
        return ["theta-sweep", str(ckpt), "--data", str(root / "prep-64"), "--context", "64", "--num-sequences", "2",
                "--candidates", "10000,40000", "--out", str(out)]
    return ["eval", command, str(ckpt), "--tokenizer", str(sample / "tokenizer"), "--lengths", "240", "--depths", "50",
            "--out", str(out), *(["--haystack", str(root / "haystack.txt")] if command == "niah" else [])]


# The plot each report writes last (after its JSON): where the disk fills up.
PLOTS = {"ppl": "lwm_jax.eval.reports.line_plot", "theta-sweep": "lwm_jax.eval.theta_sweep.line_plot",
         "passkey": "lwm_jax.eval.plots.line_plot", "niah": "lwm_jax.eval.plots.niah_heatmap"}


@pytest.mark.parametrize("command", ["ppl", "passkey", "niah", "theta-sweep"])
def test_eval_report_disk_full_leaves_nothing(root, ckpt, sample, monkeypatch, capsys, command):
    dest = root / f"report-{command}"
    dest.mkdir()
    (dest / "other.json").write_text("{}")  # an --out folder shared with other results keeps them
    argv = _eval_argv(command, ckpt, sample, dest)
    module, name = PLOTS[command].rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, _failing_after(lambda *a, **k: None, calls=1))
    err = _fails(capsys, argv)
    assert err.startswith(f"lwm-jax: error: writing {dest}") and err.endswith("No space left on device")
    assert _listing(dest) == ["other.json"]
    monkeypatch.undo()
    assert main(argv) == 0
    assert len(_listing(dest)) == 3  # other.json, and the report's JSON and PNG


# Unwritable destinations: refused in one line before any work -----------------------------------------------


def _unwritable_argv(command: str, out: str, ckpt: Path, hf_dir: Path, llama3_ckpt: Path, sample: Path,
                     recipe: Path) -> list[str]:
    if command == "train":
        return ["train", str(recipe), "--workdir", out]
    if command == "data-sample":
        return ["data", "sample", out]
    if command == "data-prepare":
        return ["data", "prepare", str(sample / "corpus"), "--tokenizer", str(sample / "tokenizer"), "--out", out,
                "--seq-len", "64"]
    if command == "export-hf":
        return ["export-hf", str(ckpt), out]
    if command == "export-gguf":
        return ["export-gguf", str(llama3_ckpt), out + "/m.gguf", "--tokenizer", str(llama3_tokenizer_dir())]
    if command == "import-hf":
        return ["import-hf", str(hf_dir), out]
    return _eval_argv(command, ckpt, sample, Path(out))


COMMANDS = ["train", "data-sample", "data-prepare", "export-hf", "export-gguf", "import-hf", "niah", "passkey", "ppl",
            "theta-sweep"]


@pytest.mark.parametrize("where", ["under-a-file", "under-proc"])
@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_output_is_one_line_before_any_work(root, ckpt, hf_dir, llama3_ckpt, sample, capsys, command, where):
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny", "model": {"base": str(ROOT / "configs/models/tiny.yaml"), "vocab_size": VOCAB},
        "data": {"paths": [str(root / "prep-64")]},
        "stages": [{"name": "base", "seq_len": 64, "steps": 1, "batch_size": 8, "init_from": "scratch"}]}))
    blocker = root / "a-file"
    blocker.write_text("not a folder")
    out = str(blocker / "out") if where == "under-a-file" else "/proc/lwm-jax-test/out"
    before = _listing(root)
    start = time.monotonic()
    err = _fails(capsys, _unwritable_argv(command, out, ckpt, hf_dir, llama3_ckpt, sample, recipe))
    assert "cannot be written" in err and (str(blocker) if where == "under-a-file" else "/proc/") in err, err
    assert time.monotonic() - start < 20  # refused before loading, evaluating or compiling anything
    assert _listing(root) == before and blocker.read_text() == "not a folder"
    assert not Path("/proc/lwm-jax-test").exists()


def test_the_next_run_removes_what_a_killed_run_left(root, ckpt):
    """A killed run (no cleanup) leaves its temporary folder beside the destination; the next removes it."""
    dest = root / "killed"
    dest.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (dest / f".hf.{int(dead.stdout)}.partial" / "sub").mkdir(parents=True)
    assert main(["export-hf", str(ckpt), str(dest / "hf")]) == 0
    assert [p.name for p in dest.iterdir()] == ["hf"]


def test_os_reason_is_read_from_the_errors_libraries_wrap_it_in():
    from lwm_jax.outputs import os_reason

    assert os_reason(OSError(errno.EFBIG, os.strerror(errno.EFBIG))) == "File too large"
    assert os_reason(ValueError("OUT_OF_RANGE: Failed writing ...: File too large [os_error_code='27']")) == \
        "File too large"  # tensorstore (orbax)
    assert os_reason(Exception("File too large (os error 27)")) == "File too large"  # tokenizers (Rust)
    assert os_reason(RuntimeError("write() failed: No space left on device; writing /x")) == \
        "No space left on device"  # array_record
    wrapped = RuntimeError("commit failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os_reason(wrapped) == "No space left on device"
    assert os_reason(ValueError("bad value")) is None


def test_a_symlinked_destination_stays_a_symlink(tmp_path):
    """Written through the link into its target (a rename onto the link would replace the link)."""
    from lwm_jax.outputs import staged_file, staged_folder

    (tmp_path / "big-disk").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "big-disk")
    with staged_folder(tmp_path / "out") as stage:
        (stage / "report.json").write_text("{}")
    (tmp_path / "big-disk" / "model.gguf").write_text("old")
    (tmp_path / "m.gguf").symlink_to(tmp_path / "big-disk" / "model.gguf")
    with staged_file(tmp_path / "m.gguf") as temporary:
        temporary.write_text("new")
    assert (tmp_path / "out").is_symlink() and (tmp_path / "m.gguf").is_symlink()
    assert sorted(p.name for p in (tmp_path / "big-disk").iterdir()) == ["model.gguf", "report.json"]
    assert (tmp_path / "m.gguf").read_text() == "new"
