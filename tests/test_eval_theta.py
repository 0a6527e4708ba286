"""theta-sweep finds the theta a checkpoint was trained at (a tiny model trained for a few dozen
Adam steps on periodic sequences, a task that needs attention at a fixed relative offset, so its
loss depends on the RoPE frequencies); golden-section search on a known function; loss by position
bucket agrees with the plain mean and shows the copy task getting easier after one period."""

import dataclasses
import json
import math

import jax
import numpy as np
import optax
import pytest

from lwm_jax.cli import main
from lwm_jax.config import DataConfig, MeshConfig, ModelConfig, RecipeConfig, from_dict
from lwm_jax.eval.perplexity import load_tokens, mean_nll
from lwm_jax.eval.theta_sweep import golden_section, stage_sweep
from lwm_jax.model.opened import open_checkpoint
from lwm_jax.model.store import merge_params, model_metadata, save_model
from lwm_jax.parallel.mesh import make_mesh
from lwm_jax.train.runner import TrainServices, sweep_stage_theta
from lwm_jax.train.schedule import init_source, schedule_recipe
from lwm_jax.train.step import build_step, init_params
from lwm_jax.train.workdir import swept_thetas

TRAINED_THETA = 100.0
PERIOD, SEQ, VOCAB = 16, 64, 300  # data ids lie in [2, 64)
TRAIN_STEPS, LEARNING_RATE, BATCH = 60, 1e-2, 16
THETA_FACTOR = 1.5  # the best candidate lies within this factor of the trained theta
NLL_ATOL = 1e-5  # bucket-weighted mean vs mean_nll (float32 sums)
POSITION_GAP = 0.2  # NLL of the first period minus that after two periods, at least
GOLDEN_RTOL = 0.05


def _periodic(rng, n: int) -> np.ndarray:
    """[n, SEQ + 1] int32: a random block of PERIOD ids repeated."""
    block = rng.integers(2, 64, size=(n, PERIOD))
    return np.tile(block, (1, SEQ // PERIOD + 1))[:, :SEQ + 1].astype(np.int32)


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=16, rope_theta=TRAINED_THETA, max_position_embeddings=SEQ,
                         remat="none", bos_token_id=0, eos_token_id=(1,))
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (1, BATCH, SEQ))
    with jax.set_mesh(mesh):
        fns = build_step(config, optax.adam(LEARNING_RATE), mesh)
        params = init_params(config, 0, mesh)
        opt_state = fns.init_opt_state(params)
        for _ in range(TRAIN_STEPS):
            toks = _periodic(rng, BATCH)
            batch = {"inputs": toks[None, :, :-1], "positions": positions, "targets": toks[None, :, 1:],
                     "segment_ids": np.ones((1, BATCH, SEQ), np.int32),
                     "loss_weights": np.ones((1, BATCH, SEQ), np.float32)}
            params, opt_state, metrics = fns.train_step(params, opt_state, batch)
    model = merge_params(config, jax.device_get(params))
    path = save_model(tmp_path_factory.mktemp("theta") / "ckpt", model, model_metadata(config))
    data = tmp_path_factory.mktemp("data") / "eval.npy"
    np.save(data, _periodic(np.random.default_rng(1), 4)[:, :SEQ])
    return path, data, float(metrics["loss"])


def test_sweep_finds_trained_theta(trained_ckpt, tmp_path, capsys):
    ckpt, data, final_loss = trained_ckpt
    assert main(["theta-sweep", str(ckpt), "--data", str(data), "--context", str(SEQ), "--num", "5", "--span", "4",
                 "--num-sequences", "4", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    thetas = [p["theta"] for p in result["points"]]
    assert len(thetas) == 5 and math.isclose(result["center_theta"], TRAINED_THETA)
    assert TRAINED_THETA / THETA_FACTOR <= result["best_theta"] <= TRAINED_THETA * THETA_FACTOR, result
    losses = [p["mean_nll"] for p in result["points"]]
    assert losses[0] > result["best_nll"] and losses[-1] > result["best_nll"]  # a real minimum, not an edge
    assert (tmp_path / "theta_sweep.png").is_file() and (tmp_path / "theta_sweep.json").is_file()


def test_recipe_sweep_stage_finds_trained_theta(trained_ckpt, tmp_path):
    """A recipe stage with `rope_theta: sweep` runs the same search from its starting checkpoint,
    saves it, and the stages after it build their theta rules on the swept value."""
    ckpt, data, _ = trained_ckpt
    recipe = from_dict(RecipeConfig, {
        "name": "sweep", "model": {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                                   "num_heads": 2, "num_kv_heads": 1, "head_dim": 16, "remat": "none",
                                   "bos_token_id": 0, "eos_token_id": [1]},
        "mesh": {"dp": 4, "sp": 2},
        "stages": [{"name": "same", "seq_len": SEQ, "steps": 1, "batch_size": 4, "init_from": f"ckpt:{ckpt}",
                    "rope_theta": "sweep", "theta_sweep": {"num": 5, "span": 4, "sequences": 4}},
                   {"name": "longer", "seq_len": 4 * SEQ, "steps": 1, "batch_size": 4, "rope_theta": "scaling-law"}]})
    recipe = dataclasses.replace(recipe, data=DataConfig(paths=[str(data)]))
    plans = schedule_recipe(recipe, 8)
    assert plans[0].theta_pending and plans[0].model.rope_theta == TRAINED_THETA  # the center, for now
    start = init_source(recipe.stages[0], recipe)
    theta, params = sweep_stage_theta(plans[0], start, recipe, tmp_path, TrainServices(sweep_theta=stage_sweep))
    assert TRAINED_THETA / THETA_FACTOR <= theta <= TRAINED_THETA * THETA_FACTOR
    assert swept_thetas(tmp_path, recipe) == {"same": theta}
    assert (tmp_path / "stages/same/theta_sweep/theta_sweep.png").is_file()
    resolved = schedule_recipe(recipe, 8, swept={"same": theta})
    assert not resolved[0].theta_pending and resolved[0].model.rope_theta == theta
    assert resolved[1].model.rope_theta == pytest.approx(
        theta ** (math.log(4 * SEQ / (2 * math.pi)) / math.log(SEQ / (2 * math.pi))))
    assert {"embed_tokens", "norm"} <= set(params)  # the starting params, handed to the stage


def test_golden_section_on_known_minimum():
    target = 2.5e6
    points = golden_section(lambda t: (math.log(t) - math.log(target)) ** 2, 1e5, 1e8, iterations=20)
    best = min(points, key=lambda p: p[1])[0]
    assert len(points) == 20 and abs(best / target - 1) <= GOLDEN_RTOL


def test_loss_by_position(trained_ckpt, tmp_path, capsys):
    ckpt, data, _ = trained_ckpt
    assert main(["eval", "ppl", str(ckpt), "--data", str(data), "--seq-len", str(SEQ), "--num-sequences", "4",
                 "--buckets", f"{PERIOD - 1},{2 * PERIOD}", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    model = open_checkpoint(ckpt).model()
    plain, count = mean_nll(model, load_tokens(data, VOCAB))
    assert result["tokens"] == count and abs(result["mean_nll"] - plain) <= NLL_ATOL
    first, _, last = result["buckets"]
    assert [b["end"] for b in result["buckets"]] == [PERIOD - 1, 2 * PERIOD, SEQ] and (tmp_path / "ppl.png").is_file()
    assert first["tokens"] == 4 * (PERIOD - 1) and last["tokens"] == 4 * (SEQ - 2 * PERIOD - 1)
    assert first["mean_nll"] > last["mean_nll"] + POSITION_GAP  # nothing to copy before one period has passed


def test_ppl_data_errors(trained_ckpt, tmp_path, capsys):
    ckpt, data, _ = trained_ckpt
    assert main(["eval", "ppl", str(ckpt), "--data", str(data), "--seq-len", str(SEQ), "--num-sequences", "99"]) == 2
    assert "fewer than 99 sequences" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["eval", "ppl", str(ckpt), "--data", str(text), "--seq-len", "8"]) == 2
    assert "give --tokenizer" in capsys.readouterr().err
    assert main(["eval", "ppl", str(ckpt)]) == 2
    assert "exactly one of --tokens" in capsys.readouterr().err
