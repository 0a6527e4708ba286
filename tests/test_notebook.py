"""Executes notebooks/walkthrough.ipynb top to bottom (without Jupyter) and checks its figures.

The notebook's code cells are concatenated into one script and run in one fresh Python process on
8 simulated CPU devices, in a temporary working directory, as a kernel would run them in order.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"
FIGURES = ("theta.png", "zigzag.png", "loss.png", "niah/niah.png")
TIMEOUT_S = 900  # about 2.5 minutes on a busy 2-core machine


def _code_cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        assert cell["outputs"] == [] and cell["execution_count"] is None, "stored outputs in the notebook"
        source = cell["source"]
        cells.append(source if isinstance(source, str) else "".join(source))
    return cells


@pytest.mark.slow  # about 2 minutes; the same train and NIAH paths run in tests/test_train.py and test_eval_niah.py
def test_walkthrough_notebook_runs(tmp_path):
    cells = _code_cells(NOTEBOOK)
    assert len(cells) >= 6
    script = tmp_path / "walkthrough.py"
    script.write_text("\n\n".join(cells) + "\n")
    out = tmp_path / "out"
    env = {**os.environ, "LWM_JAX_ROOT": str(ROOT), "LWM_JAX_NOTEBOOK_OUT": str(out), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "MPLBACKEND": "Agg",
           "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    for name in FIGURES:
        path = out / name
        assert path.is_file() and path.stat().st_size > 1000, f"{name} missing or empty"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
    assert (out / "run" / "metrics.jsonl").is_file()
    assert (out / "run" / "stages" / "long" / "checkpoints").is_dir()
    niah = json.loads((out / "niah" / "niah.json").read_text())
    assert {int(c["length"]) for c in niah["cells"]} == {256, 384, 512}
    # The zigzag cell asserts its derived block counts equal ring_block_pairs; the table prints.
    assert "ring_block_pairs: [34, 34, 34, 34]" in result.stdout
    assert "final loss" in result.stdout
