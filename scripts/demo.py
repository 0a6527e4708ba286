"""`make demo`: the whole job on the embedded CPU default, through the `lwm-jax` command.

1. the theta table for Gradient's four stages;
2. the offline demo corpus and tokenizer (`data sample`), prepared at each stage's length;
3. `train configs/recipes/demo_cpu.yaml` on 8 simulated CPU devices (dp=2, sp=4, ring attention):
   a base stage at 256 tokens, then 4x and 16x with theta raised by the scaling-law rule;
4. after each stage, passkey and needle-in-a-haystack accuracy at that stage's length (NIAH
   heatmaps saved);
5. a Hugging Face export of the last stage, and the final table.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo_out"
RECIPE = ROOT / "configs/recipes/demo_cpu.yaml"
GRADIENT = [("65K", 65_536, 15.3e6), ("262K", 262_144, 207.1e6), ("524K", 524_288, 1.06e9),
            ("1048K", 1_048_576, 2.80e9)]


def cli(*argv: str, live: bool = False) -> dict:
    """Runs `lwm-jax ARGV --json` (progress on stderr shown when `live`) and returns its JSON result."""
    proc = subprocess.run([sys.executable, "-m", "lwm_jax.cli", *argv, "--json"], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=None if live else subprocess.PIPE)
    if proc.returncode != 0:
        sys.exit(f"lwm-jax {' '.join(argv)} failed:\n{proc.stderr or ''}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    started = time.time()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    print("RoPE theta for Gradient's stages (base 500,000, head dim 128, from 8,192 tokens)")
    print(f"{'stage':>6} {'context':>10} {'NTK-aware':>15} {'scaling-law':>15} {'Gradient used':>14}")
    for name, context, used in GRADIENT:
        ntk = cli("theta", "--context", str(context), "--method", "ntk")["theta"]
        law = cli("theta", "--context", str(context))["theta"]
        print(f"{name:>6} {context:>10,} {ntk:>15,.0f} {law:>15,.0f} {used:>14,.0f}")

    print("\nDemo corpus and tokenizer (standard-library text, no download)")
    sample = OUT / "data" / "sample"
    cli("data", "sample", str(sample))
    for seq_len in (256, 1024, 4096):
        manifest = cli("data", "prepare", str(sample / "corpus"), "--tokenizer", str(sample / "tokenizer"),
                       "--out", str(OUT / "data" / f"prepared-{seq_len}"), "--seq-len", str(seq_len),
                       "--min-doc-tokens", "0")
        print(f"  prepared at seq_len {seq_len:>5}: {manifest.get('sequences', '?')} sequences")

    print("\nTraining configs/recipes/demo_cpu.yaml on 8 simulated CPU devices (dp=2, sp=4, ring attention)")
    run = cli("--cpu-devices", "8", "train", str(RECIPE), "--workdir", str(OUT / "run"), live=True)
    last = run["stages"][-1]["stage"]
    print("\nPasskey and needle-in-a-haystack at each stage's length (teacher-forced exact match)")
    scores = {}
    for s in run["stages"]:
        ckpt = str(OUT / "run" / "stages" / s["stage"] / "checkpoints")
        common = ["--tokenizer", str(sample / "tokenizer"), "--lengths", str(s["seq_len"]), "--depths", "10,50,90",
                  "--mesh", "dp=2,sp=4"]
        passkey = cli("--cpu-devices", "8", "eval", "passkey", ckpt, *common, "--out", str(OUT / "eval" / s["stage"]))
        niah = cli("--cpu-devices", "8", "eval", "niah", ckpt, *common, "--out", str(OUT / "eval" / s["stage"]))
        scores[s["stage"]] = (passkey["score"], niah["score"])
    exported = cli("export-hf", str(OUT / "run"), str(OUT / "hf"), "--stage", last,
                   "--tokenizer", str(sample / "tokenizer"))

    print(f"\n{'stage':>6} {'seq_len':>8} {'theta':>12} {'steps':>6} {'final loss':>11} {'tokens/s':>9} "
          f"{'passkey':>8} {'NIAH':>6}")
    for s in run["stages"]:
        passkey, niah = scores[s["stage"]]
        print(f"{s['stage']:>6} {s['seq_len']:>8,} {s['rope_theta']:>12,.0f} {s['steps']:>6} "
              f"{s['final_loss']:>11.4f} {s['tokens_per_s']:>9,.0f} {passkey:>8.0%} {niah:>6.0%}")
    print(f"NIAH heatmaps: {OUT / 'eval'}/<stage>/niah.png")
    print(f"\nHugging Face export of stage {last}: {exported['out_dir']}")
    print(f"metrics: {OUT / 'run' / 'metrics.jsonl'}; TensorBoard: {OUT / 'run' / 'tensorboard'}")
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
