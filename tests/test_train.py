"""`lwm-jax train`: stage chaining, exact resume after kill -9, workdir protection, and bad recipes
rejected before any compile."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from lwm_jax.cli import main
from lwm_jax.config import MeshConfig, ModelConfig, PrepareConfig, from_dict, load_recipe
from lwm_jax.data.prepare import prepare
from lwm_jax.data.sample import build_sample
from lwm_jax.model.store import read_metadata, restore_params
from lwm_jax.parallel.mesh import make_mesh
from lwm_jax.train.workdir import recipe_fingerprint
from tests.conftest import cli_error

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A small demo corpus, its tokenizer (vocab 512) and prepared shards at seq_len 32 and 128."""
    root = tmp_path_factory.mktemp("data")
    build_sample(root / "sample", vocab_size=512, max_chars_per_source=60_000)
    corpus = sorted(str(p) for p in (root / "sample" / "corpus").glob("*.jsonl.zst"))
    for seq_len in (32, 128):
        prepare(corpus, root / "sample" / "tokenizer", root / f"prep-{seq_len}",
                PrepareConfig(seq_len=seq_len, min_doc_tokens=0))
    return root


def write_recipe(path: Path, prepared: Path, **top) -> Path:
    recipe = {
        "name": "tiny",
        "model": {"base": str(ROOT / "configs/models/tiny.yaml"), "vocab_size": 512, "hidden_size": 32,
                  "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8,
                  "remat": "none", "attention": "ring", "attention_block_size": 4},
        "mesh": {"dp": 2, "sp": 4},
        "data": {"paths": [str(prepared / "prep-{seq_len}")]},
        "loss_chunk": 64,
        "stages": [
            {"name": "base", "seq_len": 32, "rope_theta": 10000, "batch_size": 2, "grad_accum": 2, "steps": 4,
             "lr": 1e-3, "init_from": "scratch", "checkpoint_every": 1, "keep_checkpoints": 10},
            {"name": "long", "seq_len": 128, "rope_theta": "sweep", "theta_sweep": {"num": 3, "span": 2},
             "batch_size": 2, "steps": 2, "lr": 1e-3},
        ],
        **top,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli(*argv, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lwm_jax.cli", "--cpu-devices", "8", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _losses(workdir: Path) -> dict:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["stage"], r["step"])] = r["loss"]
    return out


def test_two_stages_chain_export_and_rerun(tmp_path, prepared):
    recipe = write_recipe(tmp_path / "r.yaml", prepared)
    full = _cli("train", str(recipe), "--workdir", str(tmp_path / "full"), "--json")
    assert full.returncode == 0, full.stderr
    summary = json.loads(full.stdout.splitlines()[-1])
    assert [s["stage"] for s in summary["stages"]] == ["base", "long"]
    reference = _losses(tmp_path / "full")
    assert len(reference) == 6 and all(np.isfinite(v) for v in reference.values())

    # Stage chaining: theta, seq_len read back from metadata; step-0 params = previous final params.
    # The long stage's theta came from a sweep around the scaling-law value, run from base's params.
    meta = read_metadata(tmp_path / "full/stages/long/checkpoints")
    assert meta["seq_len"] == 128 and meta["max_position_embeddings"] == 128
    sweep = json.loads((tmp_path / "full/stages/long/theta_sweep/theta_sweep.json").read_text())
    assert sweep["center_theta"] == pytest.approx(10000 ** (np.log(128 / (2 * np.pi)) / np.log(32 / (2 * np.pi))))
    assert len(sweep["points"]) == 3 and sweep["trained_theta"] == 10000
    assert sweep["best_nll"] == min(p["mean_nll"] for p in sweep["points"])
    assert meta["rope_theta"] == sweep["best_theta"] == summary["stages"][1]["rope_theta"]
    base_cfg = from_dict(ModelConfig, read_metadata(tmp_path / "full/stages/base/checkpoints")["model"])
    base_final = restore_params(tmp_path / "full/stages/base/checkpoints", base_cfg, step=4)
    l2 = np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(base_final)))
    start = json.loads((tmp_path / "full/stages/long/start.json").read_text())
    assert start["param_l2"] == pytest.approx(l2, rel=1e-6)  # float32 sums on device
    # Written on dp=2,sp=4; restores onto another mesh with the same values.
    other = restore_params(tmp_path / "full/stages/base/checkpoints", base_cfg,
                           make_mesh(MeshConfig(fsdp=4, tp=2)), step=4)
    for a, b in zip(jax.tree.leaves(base_final), jax.tree.leaves(other)):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    # The last stage exports to HF with a model card carrying its length and theta.
    argv = ["export-hf", str(tmp_path / "full"), str(tmp_path / "hf"), "--stage", "long", "--dtype", "float32"]
    assert main(argv) == 0
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["max_position_embeddings"] == 128 and config["rope_theta"] == meta["rope_theta"]
    card = (tmp_path / "hf/README.md").read_text()
    assert "stage `long`" in card and "128 tokens" in card

    # Same command again: everything finished, nothing retrained. (Killed and damaged runs resuming
    # exactly are tests/test_train_reliability.py's.)
    again = _cli("train", str(recipe), "--workdir", str(tmp_path / "full"))
    assert again.returncode == 0 and "already finished" in again.stderr


@pytest.mark.parametrize("override,message", [
    ("stages.base.seq_len=36", "seq_len=36 must be divisible by 2*sp*block=32"),
    ("stages.base.batch_size=3", "batch_size=3 must be divisible by dp*fsdp=2"),
    ("mesh.sp=8", "needs 16 devices but 8 are available"),
    ("stages.long.init_from=hf:/nonexistent", "does not exist"),
    ("stages.base.rope_theta=-5", "rope_theta=-5 must be > 0"),
    ("stages.base.init_from=previous", "first stage"),
    ("stages.base.rope_theta=sweep", "sweep needs trained weights"),
    ("stages.long.theta_sweep.sequences=3", "theta_sweep.sequences=3 must be divisible by dp*fsdp=2"),
    ("model.vocab_size=256", "uses a tokenizer with 512 ids"),
])
def test_bad_recipes_fail_before_compile(tmp_path, prepared, capsys, override, message):
    recipe = write_recipe(tmp_path / "r.yaml", prepared)
    err = cli_error(capsys, ["train", str(recipe), "--workdir", str(tmp_path / "w"), "--set", override])
    assert message in err
    assert not (tmp_path / "w").exists()


def test_workdir_of_another_recipe_is_not_overwritten(tmp_path, prepared, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", prepared)
    work = tmp_path / "w"
    work.mkdir()
    (work / "recipe.json").write_text(json.dumps({"name": "other", "fingerprint": "0123"}))
    err = cli_error(capsys, ["train", str(recipe), "--workdir", str(work)])
    assert "different recipe" in err
    assert json.loads((work / "recipe.json").read_text())["name"] == "other"


def test_fingerprint_ignores_how_it_runs_but_not_what_it_computes():
    """A run may resume on another mesh, remat policy or kernel, and after a release adds a config
    field with a default; changing steps, theta or the model is a different recipe."""
    demo = ROOT / "configs/recipes/demo_cpu.yaml"
    base = recipe_fingerprint(load_recipe(demo))
    same = [["mesh.dp=1", "mesh.sp=8"], ["model.remat=dots", "stages.x4.remat=none"],
            ["model.attention_kernel=xla", "model.attention_block_size=64"], ["stages.x4.grad_accum=1"]]
    for overrides in same:
        assert recipe_fingerprint(load_recipe(demo, overrides)) == base, overrides
    for override in ("stages.x4.steps=17", "stages.base.rope_theta=20000", "model.rms_norm_eps=1e-6", "seed=1"):
        assert recipe_fingerprint(load_recipe(demo, [override])) != base, override
