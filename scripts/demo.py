"""`make demo`: the seed's claim in miniature on the CPU, in a few minutes, through the project's code.

1. the theta table for Gradient's four stages (`lwm-jax theta`'s rules);
2. the miniature (`scripts/mini_extension.py --preset demo`): a task tokenizer and retrieval data
   built offline, a small Llama-3-shaped base trained at L0 = 128 tokens until it retrieves, then
   two arms with the same data and steps, theta raised by the scaling-law rule for 4 x L0 and theta
   unchanged (the control), each trained at L0 and scored at L0 and 4 x L0 (passkey and NIAH,
   40 probes per cell, 95% Wilson intervals, heatmaps titled with model, stage, theta and length;
   past the trained length with the log-n attention temperature, and without it);
3. a Hugging Face export of the raised arm (`lwm-jax export-hf`), the final table and
   `demo_out/claim.json`.

The README shows how to score the same checkpoints on 8 simulated devices with the zigzag ring
attention (`lwm-jax --cpu-devices 8 eval passkey ... --mesh dp=2,sp=4`), the path a 1M-token run
takes; the demo leaves it out to stay within its 10 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo_out"
SEEDS_DOC = "docs/miniature.md#five-seeds"
GRADIENT = [("65K", 65_536, 15.3e6), ("262K", 262_144, 207.1e6), ("524K", 524_288, 1.06e9),
            ("1048K", 1_048_576, 2.80e9)]


def cli(*argv: str) -> dict:
    """Runs `lwm-jax ARGV --json` and returns its JSON result (its stderr shown on failure)."""
    proc = subprocess.run([sys.executable, "-m", "lwm_jax.cli", *argv, "--json"], cwd=ROOT, text=True,
                          capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"lwm-jax {' '.join(argv)} failed:\n{proc.stderr or ''}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mini_extension():
    """scripts/mini_extension.py as a module (registered first: its dataclasses look themselves up)."""
    spec = importlib.util.spec_from_file_location("mini_extension", ROOT / "scripts" / "mini_extension.py")
    module = sys.modules["mini_extension"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def theta_table() -> None:
    from lwm_jax.model.rope import theta_for

    print("RoPE theta for Gradient's stages (base 500,000, head dim 128, from 8,192 tokens; `lwm-jax theta`)")
    print(f"{'stage':>6} {'context':>10} {'NTK-aware':>15} {'scaling-law':>15} {'Gradient used':>14}")
    for name, context, used in GRADIENT:
        ntk = theta_for("ntk", context, 500_000.0, 128, 8192)
        law = theta_for("scaling-law", context, 500_000.0, 128, 8192)
        print(f"{name:>6} {context:>10,} {ntk:>15,.0f} {law:>15,.0f} {used:>14,.0f}")


def cell(ev: dict, task: str, n: int) -> str:
    lo, hi = ev["intervals"][task][n]
    return f"{ev['scores'][task][n]:.0%} [{100 * lo:.0f}-{100 * hi:.0f}]"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the miniature's seed (default 0; see docs/miniature.md)")
    args = parser.parse_args(argv)
    started = time.time()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    mini = mini_extension()
    mini.configure_jax(1)
    theta_table()

    s = dataclasses.replace(mini.PRESETS["demo"], seed=args.seed)
    four = 4 * s.l0
    trained = s.extension[0][1] * s.l0
    print(f"\nThe miniature, seed {s.seed}: base at {s.l0} tokens, then theta raised for {four} tokens vs unchanged, "
          f"both trained at {trained} (scripts/mini_extension.py --preset demo --seed {s.seed})", flush=True)
    results = mini.run(s, OUT / "mini")
    mini.report(results, s, OUT / "mini")
    claim = results["claim"]
    (OUT / "claim.json").write_text(json.dumps(claim, indent=1) + "\n")

    tokenizer = OUT / "mini" / "data" / "sample" / "tokenizer"
    exported = cli("export-hf", str(OUT / "mini" / "arm-scaling-law"), str(OUT / "hf"), "--stage", "x4",
                   "--tokenizer", str(tokenizer))

    raised, control = (results["arms"][a]["stages"]["x4"] for a in ("scaling-law", "control"))
    base = results["base"]
    print(f"\nThe claim ({claim['probes_per_cell']} probes per cell, exact match [95% Wilson interval]; past the "
          "trained length with the log-n attention temperature, the same for every model)")
    print(f"{'model':<34}{'theta':>12}{'trained at':>11}" + "".join(
        f"{f'{t} @{n}':>18}" for t in ("passkey", "NIAH") for n in (s.l0, four)))
    for name, ev, theta, length in (("base", base, s.base_theta, s.l0),
                                    ("raised theta (scaling-law, x4)", raised, raised["rope_theta"], trained),
                                    ("control (theta unchanged)", control, s.base_theta, trained)):
        print(f"{name:<34}{theta:>12,.0f}{length:>11,}" + "".join(
            f"{cell(ev, t, n):>18}" for t in ("passkey", "niah") for n in (s.l0, four)))
    for task in ("passkey", "niah"):
        row = claim[task]
        print(f"{task} at {four} tokens: raised theta {row['raised']['4x']:.0%}, control {row['control']['4x']:.0%} "
              f"({row['raised']['4x'] - row['control']['4x']:+.0%}); the base at {s.l0}: {row['base']['1x']:.0%}")
        plain = claim["untempered"][task]
        print(f"  without the temperature: raised theta {plain['raised']['4x']:.0%}, "
              f"control {plain['control']['4x']:.0%}")
    checks = mini.claim_checks(claim)
    for key, text in mini.check_lines(s.l0).items():
        if key in mini.REQUIRED:
            print(f"{'PASS' if checks[key] else 'FAIL'}  seed {s.seed}: {text}")
    print(f"The same over 5 seeds (per-seed table, spread): {SEEDS_DOC}; "
          f"run it with `python scripts/mini_extension.py --preset demo --seeds 5`")
    print(f"heatmaps: {OUT / 'mini' / 'eval'}/<checkpoint>/{{passkey,niah}}.png; figure: {results['png']}")
    print(f"claim: {OUT / 'claim.json'}; Hugging Face export of the raised arm: {exported['out_dir']}")
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
