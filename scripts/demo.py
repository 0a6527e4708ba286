"""`make demo` until the training recipe lands: the theta table for Gradient's stages, then a random
tiny Llama-3-shaped model through `import-hf` -> `eval ppl` -> `export-hf`, all through the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo_out"
STAGES = [("65K", 65_536, 15.3e6), ("262K", 262_144, 207.1e6), ("524K", 524_288, 1.06e9), ("1048K", 1_048_576, 2.80e9)]


def cli(*argv: str) -> dict:
    """Runs `lwm-jax ARGV --json` and returns its JSON result."""
    proc = subprocess.run([sys.executable, "-m", "lwm_jax.cli", *argv, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"lwm-jax {' '.join(argv)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_random_hf(folder: Path) -> None:
    """Writes a random tiny Llama (configs/models/tiny.yaml) as a Hugging Face folder."""
    from flax import nnx

    from lwm_jax.config import load_model_config
    from lwm_jax.convert.hf import export_hf
    from lwm_jax.model.llama import Llama

    model = Llama(load_model_config(ROOT / "configs/models/tiny.yaml"), nnx.Rngs(0))
    export_hf(model, folder, dtype="float32")


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    print("RoPE theta for Gradient's stages (base 500,000, head dim 128, from 8,192 tokens)")
    print(f"{'stage':>6} {'context':>10} {'NTK-aware':>15} {'scaling-law':>15} {'Gradient used':>14}")
    for name, context, used in STAGES:
        ntk = cli("theta", "--context", str(context), "--method", "ntk")["theta"]
        law = cli("theta", "--context", str(context))["theta"]
        print(f"{name:>6} {context:>10,} {ntk:>15,.0f} {law:>15,.0f} {used:>14,.0f}")

    print("\nRandom tiny model: import-hf -> eval ppl -> export-hf")
    make_random_hf(OUT / "hf_random")
    imported = cli("import-hf", str(OUT / "hf_random"), str(OUT / "ckpt"))
    import numpy as np

    np.save(OUT / "tokens.npy", np.random.default_rng(0).integers(0, 4096, size=(2, 256)))
    ppl = cli("eval", "ppl", str(OUT / "ckpt"), "--tokens", str(OUT / "tokens.npy"))
    exported = cli("export-hf", str(OUT / "ckpt"), str(OUT / "hf_export"), "--dtype", "bfloat16")
    print(f"  params {imported['params']:,}; mean NLL {ppl['mean_nll']:.4f} over {ppl['tokens']} tokens "
          f"(ln(4096) = {np.log(4096):.4f} for a random model); exported to {exported['out_dir']}")


if __name__ == "__main__":
    main()
