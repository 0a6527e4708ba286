"""Bad input at the edges of data, CLI and evaluation: damaged `.array_record` shards named in one
error line, the domains of the theta rules, `--set` values that are not YAML, the one rule for inputs
past the trained length, the `eval ppl` position buckets, `--version`, and the README's evaluation
examples on a ring checkpoint without `--mesh`."""

import json
import math
import re
import shlex
import shutil
import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from lwm_jax.cli import build_parser, main
from lwm_jax.config import DataConfig, ModelConfig, PrepareConfig
from lwm_jax.data.manifest import load_manifest
from lwm_jax.data.pipeline import build_iterator
from lwm_jax.data.prepare import prepare
from lwm_jax.data.sample import build_sample
from lwm_jax.errors import UserError
from lwm_jax.eval.perplexity import default_buckets
from lwm_jax.model.context import MAX_POSITIONS, check_context
from lwm_jax.model.llama import Llama
from lwm_jax.model.rope import ntk_theta, scaling_law_theta
from lwm_jax.model.store import model_metadata, save_model
from tests.conftest import ROOT

SEQ = 64  # prepared length
TRAINED = 256  # the checkpoint's max_position_embeddings: long enough for a NIAH prompt with this tokenizer
VOCAB = 512  # the sample tokenizer's vocabulary
# Ring over sp=4 vs blockwise on one device: the same float32 softmax merged in another order, a few
# ulps of a mean NLL near ln(512) = 6.2 (1e-5 is the single-op float32 bound of the architecture).
NLL_ATOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small sample corpus, its tokenizer (vocab 512) and shards prepared at SEQ."""
    root = tmp_path_factory.mktemp("data")
    build_sample(root / "sample", vocab_size=VOCAB, max_chars_per_source=40_000)
    corpus = sorted(str(p) for p in (root / "sample" / "corpus").glob("*.jsonl.zst"))
    prepare(corpus, root / "sample" / "tokenizer", root / f"prep-{SEQ}", PrepareConfig(seq_len=SEQ, min_doc_tokens=0))
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random tiny Llama checkpoint made for ring attention (as the demo's are), trained length TRAINED."""
    config = ModelConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8, max_position_embeddings=TRAINED, remat="none", attention="ring",
                         attention_block_size=4, bos_token_id=VOCAB - 5, eos_token_id=(VOCAB - 4,))
    return save_model(tmp_path_factory.mktemp("ckpt") / "c", Llama(config, nnx.Rngs(0)), model_metadata(config))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lwm-jax: error: "), err
    return err[0]


def _largest_shard(prepared: Path) -> Path:
    return max((prepared / "shards").glob("*.array_record"), key=lambda p: p.stat().st_size)


def _recipe(path: Path, data_dir: Path) -> Path:
    recipe = {"name": "tiny", "model": {"base": str(ROOT / "configs/models/tiny.yaml"), "vocab_size": VOCAB,
                                        "hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2,
                                        "num_kv_heads": 1, "head_dim": 8, "remat": "none", "attention": "ring",
                                        "attention_block_size": 4},
              "mesh": {"dp": 2, "sp": 4}, "data": {"paths": [str(data_dir)]}, "loss_chunk": 64,
              "stages": [{"name": "base", "seq_len": SEQ, "rope_theta": 10000, "batch_size": 2, "steps": 1,
                          "lr": 1e-3, "init_from": "scratch"}]}
    path.write_text(yaml.safe_dump(recipe))
    return path


# --- damaged shards --------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["to-30000-bytes", "last-100-bytes"])
def test_truncated_shard_is_one_line_naming_the_file(data, ckpt, tmp_path, capsys, cut):
    damaged = tmp_path / "prep"
    shutil.copytree(data / f"prep-{SEQ}", damaged)
    shard = _largest_shard(damaged)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(30_000 if cut == "to-30000-bytes" else size - 100)
    with pytest.raises(UserError, match=re.escape(str(shard))):
        load_manifest(damaged)
    # eval ppl --data and train: one line naming the file, exit 2 (train before anything compiles).
    assert main(["eval", "ppl", str(ckpt), "--data", str(damaged), "--seq-len", str(SEQ), "--num-sequences", "2"]) == 2
    line = _one_error_line(capsys)
    assert str(shard) in line and "truncated or corrupted" in line
    workdir = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path / "r.yaml", damaged)), "--workdir", str(workdir)]) == 2
    line = _one_error_line(capsys)
    assert str(shard) in line and "truncated or corrupted" in line


def test_corrupted_record_is_named_when_it_is_read(data, ckpt, tmp_path, capsys):
    damaged = tmp_path / "prep"
    shutil.copytree(data / f"prep-{SEQ}", damaged)
    source, first = next(iter(load_manifest(damaged)["sources"].items()))  # what `eval ppl --data` reads first
    assert first["shard_records"][0] >= 8
    shard = Path(first["shard_paths"][0])
    with open(shard, "r+b") as f:  # inside record 2 or 3 (one record of ~300 bytes per chunk); the index is intact
        f.seek(1000)
        f.write(b"\xff" * 32)
    iterator = build_iterator(DataConfig(paths=(str(damaged),), weights={source: 1.0}, shuffle=False), seq_len=SEQ,
                              global_batch_size=2, seed=0, process_index=0, process_count=1)
    with pytest.raises(UserError, match=re.escape(str(shard))):
        for _ in range(20):
            next(iterator)
    iterator.close()
    assert main(["eval", "ppl", str(ckpt), "--data", str(damaged), "--seq-len", str(SEQ), "--num-sequences",
                 "8"]) == 2
    assert str(shard) in _one_error_line(capsys)


# --- --set values that are not YAML, the theta rules' domains ----------------------------------------


def test_set_value_that_is_not_yaml(data, tmp_path, capsys):
    recipe = _recipe(tmp_path / "r.yaml", data / f"prep-{SEQ}")
    assert main(["train", str(recipe), "--workdir", str(tmp_path / "w"), "--set", "data.paths=[/x-{seq_len}]"]) == 2
    line = _one_error_line(capsys)
    assert "data.paths=[/x-{seq_len}]" in line and "not valid YAML" in line


@pytest.mark.parametrize("args, problem", [
    (["--orig-context", "7"], "past float64"),  # ln(7/2π) = 0.108: theta = 10**634 at 1M
    (["--orig-context", "6"], "L0=6 is not > 2π"),  # ln(6/2π) < 0: theta fell to 0 before
    (["--context", "6"], "L=6 is not > 2π"),
    (["--base", "1"], "b=1 is not > 1"),
    (["--method", "ntk", "--head-dim", "2"], "d=2 is not even and > 2"),
    (["--method", "ntk", "--context", "8", "--orig-context", "1000000000000"], "not > 1"),
])
def test_theta_outside_its_domain_is_one_line(capsys, args, problem):
    context = [] if "--context" in args else ["--context", "1048576"]
    assert main(["theta", *context, *args]) == 2
    line = _one_error_line(capsys)
    assert problem in line and "is defined for" in line


def test_theta_rules_at_the_edge_of_their_domain():
    # L0 = 7 is in the domain: defined while ln(b)·ln(L/2π)/ln(L0/2π) <= ln(float64 max) = 709.78.
    edge = 2 * math.pi * math.exp(709.0 * math.log(7 / (2 * math.pi)) / math.log(500_000.0))
    assert 1 < scaling_law_theta(int(edge), 500_000.0, 7) < math.inf
    with pytest.raises(UserError, match="past float64"):
        scaling_law_theta(int(edge * 1.1), 500_000.0, 7)
    assert scaling_law_theta(8192, 500_000.0, 8192) == pytest.approx(500_000.0)
    assert ntk_theta(8192, 500_000.0, 4, 8192) == pytest.approx(500_000.0)


# --- inputs past the trained length ------------------------------------------------------------------


def test_one_length_rule(capsys):
    assert check_context(SEQ, SEQ, what="length") is False
    assert capsys.readouterr().err == ""
    assert check_context(SEQ + 1, SEQ, what="length") is True
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lwm-jax: warning: ") and f"max_position_embeddings={SEQ}" in err[0]
    with pytest.raises(UserError, match="--max-length"):
        check_context(SEQ + 1, SEQ, what="length", limit=SEQ)
    with pytest.raises(UserError, match="uint32"):
        check_context(MAX_POSITIONS + 1, SEQ, what="length", limit=MAX_POSITIONS * 2)


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lwm-jax: warning: ")]


def test_generate_and_ppl_warn_past_the_trained_length(ckpt, tmp_path, capsys):
    rng = np.random.default_rng(0)
    prompt = tmp_path / "prompt.npy"
    np.save(prompt, rng.integers(0, VOCAB - 5, TRAINED - 8).astype(np.int32))
    assert main(["generate", str(ckpt), "--tokens", str(prompt), "--max-new-tokens", "8", "--json"]) == 0
    assert _warnings(capsys.readouterr().err) == []
    assert main(["generate", str(ckpt), "--tokens", str(prompt), "--max-new-tokens", "40", "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out.splitlines()[-1])["new_tokens"]) >= 1
    assert len(_warnings(err)) == 1 and f"new tokens={TRAINED + 32}" in err
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, rng.integers(0, VOCAB, (2, 2 * TRAINED)).astype(np.int32))
    assert main(["eval", "ppl", str(ckpt), "--tokens", str(tokens), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["tokens"] == 2 * (2 * TRAINED - 1)
    assert len(_warnings(err)) == 1 and f"length={2 * TRAINED:,}" in err


def test_probes_refuse_past_max_length_and_warn_with_it(data, ckpt, tmp_path, capsys):
    length = 2 * TRAINED
    base = ["eval", "passkey", str(ckpt), "--tokenizer", str(data / "sample" / "tokenizer"), "--depths", "50",
            "--lengths", str(length)]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    assert f"max_length={TRAINED}" in _one_error_line(capsys)
    assert main([*base, "--max-length", str(length), "--out", str(tmp_path / "b"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert list(json.loads(out.splitlines()[-1])["by_length"]) == [str(length)]
    assert len(_warnings(err)) == 1


# --- position buckets, --version, the README's examples ------------------------------------------------


@pytest.mark.parametrize("seq, edges", [
    (256, [0, 256]), (1024, [0, 1024]), (4096, [0, 1024, 4096]), (5000, [0, 1024, 4096, 5000]),
    (65_536, [0, 1024, 4096, 16_384, 65_536]),
])
def test_default_buckets_are_1k_then_x4(seq, edges):
    assert default_buckets(seq) == edges


def test_buckets_help_and_readme_say_the_same():
    readme = (ROOT / "README.md").read_text()
    assert "0–1K, 1K–4K, 4K–16K, … ×4" in readme
    sub = build_parser()._subparsers._group_actions[0].choices["eval"]._subparsers._group_actions[0].choices
    assert "0-1K, 1K-4K, ... x4" in sub["ppl"].format_help().replace("\n", " ").replace("  ", " ")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"lwm-jax {version} (jax {jax.__version__})"


def _readme_block(after: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```bash\n", readme.index(after)) + len("```bash\n")
    return readme[start:readme.index("```", start)]


def test_readme_prepares_what_the_cpu_recipe_reads():
    block = _readme_block("The 8-device CPU recipe by hand")
    recipe = yaml.safe_load((ROOT / "configs/recipes/demo_cpu.yaml").read_text())
    loop = re.search(r"for n in ([\d ]+); do", block).group(1).split()
    assert sorted(map(int, loop)) == sorted(s["seq_len"] for s in recipe["stages"])
    assert "--out " + recipe["data"]["paths"][0].replace("{seq_len}", "$n") in block
    assert "train configs/recipes/demo_cpu.yaml" in block


def test_readme_eval_examples_parse_and_run_on_a_ring_checkpoint_without_mesh(data, ckpt, tmp_path, capsys):
    lines = [ln for ln in _readme_block("## Generation and evaluation").splitlines() if ln.startswith("lwm-jax ")]
    assert {"generate", "niah", "passkey", "ruler", "ppl", "theta-sweep"} <= {w for ln in lines for w in ln.split()}
    for line in lines:  # every example is a valid command line
        build_parser().parse_args(shlex.split(line.replace("$CKPT", "c").replace("$TOK", "t"))[1:])
    tok, prepared = str(data / "sample" / "tokenizer"), str(data / f"prep-{SEQ}")
    assert main(["eval", "niah", str(ckpt), "--tokenizer", tok, "--lengths", str(TRAINED), "--depths", "50",
                 "--out", str(tmp_path / "n")]) == 0
    assert main(["theta-sweep", str(ckpt), "--data", prepared, "--context", str(SEQ), "--num", "2",
                 "--num-sequences", "2"]) == 0
    ppl = ["eval", "ppl", str(ckpt), "--data", prepared, "--seq-len", str(SEQ), "--num-sequences", "2", "--json"]
    capsys.readouterr()
    assert main(ppl) == 0
    blockwise = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main([*ppl, "--mesh", "dp=2,sp=4"]) == 0  # the checkpoint's own ring, over sp=4
    ring = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert abs(blockwise["mean_nll"] - ring["mean_nll"]) <= NLL_ATOL


# --- write-failure issue, cases 5 and 7: inputs that used to end in tracebacks or mislead ---------------


def test_manifest_seq_len_that_disagrees_with_its_records_is_named(data, ckpt, tmp_path, capsys):
    """A manifest saying seq_len 2*SEQ beside records of SEQ+1 tokens passed every count and failed in
    the runner's batch assembly; the first record's length is now checked when the manifest is read."""
    from lwm_jax.cli import main
    from lwm_jax.data.manifest import load_manifest
    from lwm_jax.errors import UserError

    edited = tmp_path / "prep"
    shutil.copytree(data / f"prep-{SEQ}", edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    (edited / "manifest.json").write_text(json.dumps({**manifest, "seq_len": 2 * SEQ}))
    with pytest.raises(UserError, match=f"its records hold {SEQ + 1} tokens but manifest.json says seq_len {2 * SEQ}"):
        load_manifest(edited)
    recipe = _recipe(tmp_path / "r.yaml", edited)
    text = yaml.safe_load(recipe.read_text())
    text["stages"][0]["seq_len"] = 2 * SEQ
    recipe.write_text(yaml.safe_dump(text))
    assert main(["train", str(recipe), "--workdir", str(tmp_path / "w")]) == 2  # before anything compiles
    assert f"its records hold {SEQ + 1} tokens" in _one_error_line(capsys)
    assert not (tmp_path / "w").exists()


def test_theta_sweep_context_below_two_is_one_line(data, ckpt, capsys):
    from lwm_jax.cli import main

    for context in ("0", "1", "-5"):
        assert main(["theta-sweep", str(ckpt), "--data", str(data / f"prep-{SEQ}"), "--context", context]) == 2
        assert f"--context={context} must be >= 2" in _one_error_line(capsys)


def test_prepare_of_only_bad_inputs_is_an_error_and_writes_nothing(data, tmp_path, capsys):
    from lwm_jax.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('not json\n{"no_text": 1}\n')
    (tmp_path / "in" / "b.jsonl").write_text("")
    argv = ["data", "prepare", str(tmp_path / "in"), "--tokenizer", str(data / "sample" / "tokenizer"),
            "--out", str(tmp_path / "out"), "--seq-len", str(SEQ)]
    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after its progress line
    assert line.startswith("lwm-jax: error: none of the 2 input file(s) held a usable record") and \
        "malformed_json 1" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_repeated_lengths_and_depths_run_once():
    from lwm_jax.eval.scoring import parse_depths, parse_lengths

    assert parse_lengths(",".join(["1K"] * 10_000)) == [1024]
    assert parse_lengths("4K,1K,1024,4096") == [4096, 1024]
    assert parse_depths("50,0,50,100,0") == [0.5, 0.0, 1.0]


def test_messages_name_what_the_path_is(data, ckpt, tmp_path, capsys):
    """A folder is not said to be missing, eval ppl's --data files are not haystack files, and a
    train workdir (or a stage folder) given as a checkpoint points to its checkpoint folders."""
    from lwm_jax.cli import main

    tokenizer = str(data / "sample" / "tokenizer")
    assert main(["eval", "niah", str(ckpt), "--tokenizer", tokenizer, "--lengths", "128", "--haystack",
                 str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert _one_error_line(capsys).endswith(f"haystack file {tmp_path} is a folder, not a file")
    assert main(["eval", "ppl", str(ckpt), "--data", str(tmp_path / "missing.txt"), "--tokenizer", tokenizer]) == 2
    assert _one_error_line(capsys).endswith(f"--data file {tmp_path / 'missing.txt'} does not exist")

    workdir = tmp_path / "w"
    (workdir / "stages" / "base" / "checkpoints").mkdir(parents=True)
    (workdir / "recipe.json").write_text("{}")
    tokens = tmp_path / "t.npy"
    np.save(tokens, np.zeros((1, 8), np.int32))
    for given, hint in [(workdir, f"its checkpoints are in {workdir}/stages/NAME/checkpoints (NAME: base)"),
                        (workdir / "stages" / "base", f"checkpoints are in {workdir}/stages/base/checkpoints"),
                        (tokens, "is a file, not a checkpoint folder")]:
        assert main(["eval", "ppl", str(given), "--tokens", str(tokens)]) == 2
        assert hint in _one_error_line(capsys)
