"""`scripts/mini_extension.py`: the quick run (data, base, four arms, passkey and NIAH with
intervals, heatmaps, figure, claim.json) reports every arm at every length; each arm's stages aim
its rule at the stage's target and train at a quarter of it; the claim reads each stage at its target."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

import lwm_jax.data.manifest
from lwm_jax.model.rope import theta_for

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("scaling-law", "ntk", "yarn", "control")
TASKS = ("passkey", "niah")


@pytest.mark.slow  # about 2 minutes on 2 CPU cores
def test_quick_run_reports_every_arm_and_length(tmp_path):
    out = tmp_path / "mini"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "mini_extension.py"), "--quick", "--json",
                           "--out", str(out)], cwd=ROOT, text=True, capture_output=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    lengths = result["lengths"]
    l0 = result["settings"]["l0"]
    assert lengths == [l0, 4 * l0, 16 * l0]
    assert set(result["arms"]) == set(ARMS)
    probes = result["probes_per_cell"]
    for task in TASKS:
        assert set(result["base"]["scores"][task]) == {str(n) for n in lengths}
    thetas = {}
    for arm in ARMS:
        stages = result["arms"][arm]["stages"]
        assert list(stages) == ["x4", "x16"]
        assert [st["seq_len"] for st in stages.values()] == [l0, 4 * l0]  # a quarter of each target
        for stage in stages.values():
            for task in TASKS:
                scores, intervals = stage["scores"][task], stage["intervals"][task]
                assert set(scores) == set(intervals) == {str(n) for n in lengths}
                for n, p in scores.items():
                    lo, hi = intervals[n]
                    assert 0.0 <= lo <= p <= hi <= 1.0 and round(p * probes) == pytest.approx(p * probes)
            heatmap = Path(stage["heatmaps"]) / "niah.json"
            assert json.loads(heatmap.read_text())["task"] == "niah"
            assert "log-n temperature" in json.loads(heatmap.read_text())["title"]
            assert (Path(stage["heatmaps"]) / "untempered" / "niah.json").is_file()
            for task in TASKS:  # within the trained length the temperature is 1: the same scores
                for n in (n for n in lengths if n <= stage["seq_len"]):
                    assert stage["scores"][task][str(n)] == stage["untempered"]["scores"][task][str(n)]
        thetas[arm] = [stages[name]["rope_theta"] for name in ("x4", "x16")]
    base = result["settings"]["base_theta"]
    assert thetas["control"] == [base, base] and thetas["yarn"] == [base, base]
    assert base < thetas["ntk"][0] < thetas["scaling-law"][0]  # NTK raises theta less than the scaling law
    assert thetas["ntk"][0] < thetas["ntk"][1] and thetas["scaling-law"][0] < thetas["scaling-law"][1]
    assert (out / "mini_extension.png").stat().st_size > 10_000
    claim = json.loads((out / "claim.json").read_text())
    assert claim["L0"] == l0 and claim["probes_per_cell"] == probes and claim["temperature"] == "log-n"
    assert set(claim["untempered"]) == set(TASKS)
    assert claim["passkey"]["raised"]["4x"] == result["arms"]["scaling-law"]["stages"]["x4"]["scores"]["passkey"][
        str(4 * l0)]
    table = proc.stdout
    for arm in ARMS:
        assert f"{arm} x4" in table and f"{arm} x16" in table


def _script():
    """scripts/mini_extension.py as a module (registered first: its dataclasses look themselves up)."""
    if "mini_extension" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mini_extension", ROOT / "scripts" / "mini_extension.py")
        sys.modules["mini_extension"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["mini_extension"])
    return sys.modules["mini_extension"]


def test_copy_documents_repeat_a_run_of_digit_tokens(tmp_path, llama3_tokenizer):
    tokenizer, _ = llama3_tokenizer
    path = tmp_path / "copy.array_record"
    assert _script().copy_documents(tokenizer, 200, path, seed=3) == 200
    reader = ArrayRecordReader(str(path))
    docs = [np.frombuffer(r, "<i4") for r in reader.read_all()]
    reader.close()
    assert len(docs) == 200
    runs, repeats = set(), set()
    for ids in docs:
        text = [tokenizer.id_to_token(int(i)) for i in ids]
        assert all(t.isascii() and t.isdigit() for t in text), text
        run = next(n for n in range(3, 11)
                   if len(ids) % n == 0 and np.array_equal(ids, np.tile(ids[:n], len(ids) // n)))
        runs.add(run)
        repeats.add(len(ids) // run)
    assert runs == set(range(3, 11)) and repeats == {2, 3, 4}


def test_data_weights_split_retrieval_copy_and_corpus(monkeypatch):
    """Corpus sources by token count, retrieval split by `niah`, copy as given."""
    sources = {"code": {"kept_tokens": 300}, "docs": {"kept_tokens": 100}, "passkey": {"kept_tokens": 5},
               "niah": {"kept_tokens": 5}, "copy": {"kept_tokens": 5}}
    monkeypatch.setattr(lwm_jax.data.manifest, "load_manifest", lambda path: {"sources": sources})
    module = _script()
    weights = module.data_weights(0.5, Path("unused"), copy=0.3)
    assert weights == pytest.approx({"code": 0.15, "docs": 0.05, "passkey": 0.25, "niah": 0.25, "copy": 0.3})
    assert module.data_weights(0.0, Path("unused"), copy=1.0) == {"copy": 1.0}
    assert module.data_weights(0.5, Path("unused"), copy=0.3, niah=0.8) == pytest.approx(
        {"code": 0.15, "docs": 0.05, "passkey": 0.1, "niah": 0.4, "copy": 0.3})
    del sources["copy"]  # a length without copy documents gives their share to the corpus
    assert module.data_weights(0.5, Path("unused"), copy=0.3) == pytest.approx(
        {"code": 0.375, "docs": 0.125, "passkey": 0.25, "niah": 0.25})


def test_arm_stages_aim_each_rule_at_its_target_and_train_at_a_quarter():
    module = _script()
    s = module.PRESETS["default"]
    d = s.model["head_dim"]
    for arm, rule in module.ARMS.items():
        stages = module.arm_stages(s, rule, Path("/base"))
        assert [st["name"] for st in stages] == [f"x{m}" for m, *_ in s.extension]
        assert [st["seq_len"] for st in stages] == [t * s.l0 for _, t, *_ in s.extension]
        assert stages[0]["init_from"] == "ckpt:/base" and stages[1]["init_from"] == "previous"
        for st, (m, *_rest) in zip(stages, s.extension):
            expected = s.base_theta if rule in (None, "yarn") else theta_for(rule, m * s.l0, s.base_theta, d, s.l0)
            assert float(st["rope_theta"]) == pytest.approx(expected)
            assert ("rope" in st) == (arm == "yarn")
            if arm == "yarn":
                assert st["rope"] == {"type": "yarn", "factor": m, "original_max_position_embeddings": s.l0}


def test_claim_takes_each_stage_at_its_own_target_length():
    module = _script()
    s = module.PRESETS["demo"]
    assert s.temperature == "log-n"

    def ev(p4):  # tempered p4 at 4 x L0, untempered p4 / 2
        return {"scores": {t: {s.l0: 0.95, 4 * s.l0: p4} for t in TASKS},
                "untempered": {"scores": {t: {s.l0: 0.95, 4 * s.l0: p4 / 2} for t in TASKS}}}

    results = {"base": ev(0.05), "arms": {"scaling-law": {"stages": {"x4": ev(0.9)}},
                                          "control": {"stages": {"x4": ev(0.1)}}}}
    claim = module.claim(results, s)
    assert claim["L0"] == s.l0 and claim["probes_per_cell"] == len(s.eval_depths) * s.eval_samples == 40
    assert claim["temperature"] == "log-n"
    for task in TASKS:
        assert claim[task] == {"base": {"1x": 0.95}, "raised": {"4x": 0.9, "16x": None},
                               "control": {"4x": 0.1, "16x": None}}
        assert claim["untempered"][task] == {"base": {"1x": 0.95}, "raised": {"4x": 0.45, "16x": None},
                                             "control": {"4x": 0.05, "16x": None}}
    untempered = module.claim(results, dataclasses.replace(s, temperature="none"))
    assert "untempered" not in untempered and untempered["passkey"]["raised"]["4x"] == 0.9
