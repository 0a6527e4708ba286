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
    s = dataclasses.replace(module.PRESETS["demo"], seed=3)
    assert s.temperature == "log-n"

    def ev(p4):  # tempered p4 at 4 x L0, untempered p4 / 2; the interval at 4 x L0 [p / 2, p]
        def scored(p):
            return {"scores": {t: {s.l0: 0.95, 4 * s.l0: p} for t in TASKS},
                    "intervals": {t: {s.l0: (0.9, 1.0), 4 * s.l0: (p / 2, p)} for t in TASKS}}
        return {**scored(p4), "untempered": scored(p4 / 2)}

    results = {"base": ev(0.05), "arms": {"scaling-law": {"stages": {"x4": ev(0.9)}},
                                          "control": {"stages": {"x4": ev(0.1)}}}}
    claim = module.claim(results, s)
    assert claim["L0"] == s.l0 and claim["probes_per_cell"] == len(s.eval_depths) * s.eval_samples == 40
    assert claim["temperature"] == "log-n" and claim["seed"] == 3
    for task in TASKS:
        assert claim[task] == {
            "base": {"1x": 0.95}, "raised": {"4x": 0.9, "16x": None}, "control": {"4x": 0.1, "16x": None},
            "interval": {"base": {"1x": [0.9, 1.0]}, "raised": {"4x": [0.45, 0.9], "16x": None},
                         "control": {"4x": [0.05, 0.1], "16x": None}}}
        untempered = claim["untempered"][task]
        assert untempered["raised"] == {"4x": 0.45, "16x": None} and untempered["control"] == {"4x": 0.05, "16x": None}
        assert untempered["interval"]["raised"]["4x"] == [0.225, 0.45]
    untempered = module.claim(results, dataclasses.replace(s, temperature="none"))
    assert "untempered" not in untempered and untempered["passkey"]["raised"]["4x"] == 0.9


def _claim(base=(1.0, 1.0), raised=0.9, control=0.1, niah=(0.7, 0.0), untempered_niah=(0.1, 0.0), width=0.1):
    """A claim.json-shaped dict: base (passkey, NIAH) at L0, passkey and NIAH (raised, control) at 4x,
    each 4x cell's interval +-`width`."""

    def row(b, r, c):
        return {"base": {"1x": b}, "raised": {"4x": r, "16x": None}, "control": {"4x": c, "16x": None},
                "interval": {"base": {"1x": [b - 0.1, b]}, "raised": {"4x": [r - width, r + width], "16x": None},
                             "control": {"4x": [c - width, c + width], "16x": None}}}

    return {"L0": 128, "seed": 0, "probes_per_cell": 40, "raised_arm": "scaling-law", "temperature": "log-n",
            "passkey": row(base[0], raised, control), "niah": row(base[1], *niah),
            "untempered": {"passkey": row(base[0], raised, control), "niah": row(base[1], *untempered_niah)}}


@pytest.mark.parametrize("claim, failed", [
    (_claim(), set()),
    (_claim(base=(1.0, 0.85)), {"base"}),  # NIAH at L0 counts too
    (_claim(base=(0.875, 1.0)), {"base"}),
    (_claim(base=(0.9, 0.9)), set()),  # the bound itself passes
    (_claim(raised=0.775, control=0.0), {"raised"}),
    (_claim(raised=0.85, control=0.575, width=0.0), {"gap"}),  # 27.5 points
    (_claim(raised=0.8, control=0.5, width=0.0), set()),  # 30 points, intervals apart
    (_claim(raised=0.8, control=0.5, width=0.2), {"gap"}),  # 30 points, intervals overlap
    (_claim(raised=0.95, control=0.6, width=0.2), {"gap"}),  # 35 points, intervals overlap
])
def test_claim_checks_apply_the_bounds_per_seed(claim, failed):
    checks = _script().claim_checks(claim)
    assert {k for k in ("base", "raised", "gap") if not checks[k]} == failed
    assert checks["niah_gap"] and not checks["niah_gap_untempered"]


def test_sweep_report_prints_each_seed_the_spread_and_each_check(capsys):
    module = _script()
    claims = [_claim(), _claim(raised=0.7, control=0.05), _claim(base=(1.0, 0.5))]
    rows = [{"seed": k, "claim": {**c, "seed": k}, "timings": {"total_s": 400.0 + k}, "checks": module.claim_checks(c)}
            for k, c in enumerate(claims)]
    module.sweep_report({"seeds": rows, "wall_s": 1203.0, "cpu_s": 2000.0, "passed": False})
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "seed" in lines[1] and "raised pk@512" in lines[1]
    assert [line.split()[0] for line in lines[2:5]] == ["0", "1", "2"]
    assert "90% [80-100]" in lines[2] and "70% [60-80] (10%)" in lines[2]  # NIAH untempered in parentheses
    assert "passkey raised at 512: mean 83%, min 70%, max 90%" in out
    assert "FAIL  base >= 90% passkey and >= 90% NIAH at 128: 2/3 seeds (not seed 2)" in out
    assert "FAIL  raised theta >= 80% passkey at 512: 2/3 seeds (not seed 1)" in out
    assert "PASS  raised theta >= control + 30 points on passkey at 512, Wilson intervals apart: 3/3 seeds" in out
    assert "(reported) the same on NIAH at 512, no temperature: 0/3 seeds" in out
    assert "the sweep 1203 s wall, 2000 s CPU" in out


def test_a_reused_out_must_hold_the_same_settings(tmp_path):
    module = _script()
    s = module.PRESETS["quick"]
    module.check_reuse(s, tmp_path)  # nothing there yet
    (tmp_path / "settings.json").write_text(json.dumps(dataclasses.asdict(s)))
    module.check_reuse(s, tmp_path)
    with pytest.raises(SystemExit, match="other settings \\(seed\\)"):
        module.check_reuse(dataclasses.replace(s, seed=1), tmp_path)


def test_seed_flag_sets_the_seed_and_keeps_the_preset():
    module = _script()
    s = module.settings_from(module.parse_args(["--preset", "demo", "--seed", "4"]))
    assert s == dataclasses.replace(module.PRESETS["demo"], seed=4)
    assert module.settings_from(module.parse_args(["--preset", "demo", "--set", "seed=2"])).seed == 2
