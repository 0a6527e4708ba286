"""Smoke test of `scripts/mini_extension.py --quick`: the whole miniature extension (data, base,
three arms, passkey and NIAH evaluation, figure) runs and reports every arm at every length."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("scaling-law", "ntk", "yarn", "control")
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
        for stage in stages.values():
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


def _script():
    """scripts/mini_extension.py as a module (registered first: its dataclasses look themselves up)."""
    if "mini_extension" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mini_extension", ROOT / "scripts" / "mini_extension.py")
        sys.modules["mini_extension"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["mini_extension"])
    return sys.modules["mini_extension"]


def test_copy_documents_repeat_a_run_of_digit_tokens(tmp_path, llama3_tokenizer):
    from array_record.python.array_record_module import ArrayRecordReader

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
    import lwm_jax.data.manifest

    sources = {"code": {"kept_tokens": 300}, "docs": {"kept_tokens": 100}, "passkey": {"kept_tokens": 5},
               "niah": {"kept_tokens": 5}, "copy": {"kept_tokens": 5}}
    monkeypatch.setattr(lwm_jax.data.manifest, "load_manifest", lambda path: {"sources": sources})
    module = _script()
    weights = module.data_weights(0.5, Path("unused"), copy=0.3)
    assert weights == pytest.approx({"code": 0.15, "docs": 0.05, "passkey": 0.25, "niah": 0.25, "copy": 0.3})
    assert module.data_weights(0.0, Path("unused"), copy=1.0) == {"copy": 1.0}
    del sources["copy"]  # a length without copy documents gives their share to the corpus
    assert module.data_weights(0.5, Path("unused"), copy=0.3) == pytest.approx(
        {"code": 0.375, "docs": 0.125, "passkey": 0.25, "niah": 0.25})
