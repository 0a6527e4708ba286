"""Smoke test of `scripts/mini_extension.py --quick`: the whole miniature extension (data, base,
three arms, passkey and NIAH evaluation, figure) runs and reports every arm at every length."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("scaling-law", "ntk", "control")
TASKS = ("passkey", "niah")


@pytest.mark.slow  # about 3 minutes on 2 CPU cores
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
    for task in TASKS:
        assert set(result["base"]["scores"][task]) == {str(n) for n in lengths}
    thetas = {}
    for arm in ARMS:
        stages = result["arms"][arm]["stages"]
        assert list(stages) == ["x4", "x16"]
        for name, stage in stages.items():
            for task in TASKS:
                scores = stage["scores"][task]
                assert set(scores) == {str(n) for n in lengths}
                assert all(0.0 <= v <= 1.0 for v in scores.values())
        thetas[arm] = [stages[name]["rope_theta"] for name in ("x4", "x16")]
    base = result["settings"]["base_theta"]
    assert thetas["control"] == [base, base]
    assert base < thetas["ntk"][0] < thetas["scaling-law"][0]  # NTK raises theta less than the scaling law
    assert thetas["ntk"][0] < thetas["ntk"][1] and thetas["scaling-law"][0] < thetas["scaling-law"][1]
    assert (out / "mini_extension.png").stat().st_size > 10_000
    assert json.loads((out / "results.json").read_text())["arms"].keys() == set(ARMS)
    table = proc.stdout
    for arm in ARMS:
        assert f"{arm} x4" in table and f"{arm} x16" in table
