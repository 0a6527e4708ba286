"""The empirical RoPE-theta search: long-context loss of a checkpoint at candidate thetas, without
training (same weights, only the rotary base changed), over log-spaced candidates around the
scaling-law value or by golden-section search in log theta; returns every point and the best.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from lwm_jax.config import ThetaSweepConfig
from lwm_jax.errors import UserError
from lwm_jax.eval.perplexity import load_eval_data, mean_nll
from lwm_jax.eval.plots import line_plot
from lwm_jax.model.rope import scaling_law_theta
from lwm_jax.model.store import merge_params
from lwm_jax.progress import log

DEFAULT_CANDIDATES = 7  # log-spaced points
DEFAULT_SPAN = 8.0  # candidates run from center/span to center*span
GOLDEN = (math.sqrt(5) - 1) / 2


def center_theta(base: float, context: int, orig_context: int) -> float:
    """The scaling-law theta for `context` from a model trained at `orig_context` with `base`
    (the base itself when the context is not longer)."""
    return scaling_law_theta(context, base, orig_context) if context > orig_context else base


def log_spaced(center: float, num: int = DEFAULT_CANDIDATES, span: float = DEFAULT_SPAN) -> list[float]:
    """`num` thetas log-spaced over [center/span, center*span] (center included when num is odd)."""
    if num < 1 or span < 1:
        raise UserError(f"candidates={num} must be >= 1 and span={span} >= 1")
    if num == 1:
        return [float(center)]
    return [float(t) for t in np.exp(np.linspace(math.log(center / span), math.log(center * span), num))]


def golden_section(loss: Callable[[float], float], lo: float, hi: float, iterations: int) -> list[tuple[float, float]]:
    """Golden-section minimisation of `loss(theta)` over log theta in [lo, hi]; every (theta, loss)."""
    if not 0 < lo < hi:
        raise UserError(f"search bracket [{lo}, {hi}] must satisfy 0 < lo < hi")
    a, b = math.log(lo), math.log(hi)
    seen: list[tuple[float, float]] = []

    def f(x: float) -> float:
        value = loss(math.exp(x))
        seen.append((math.exp(x), value))
        return value

    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(max(0, iterations - 2)):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = f(d)
    return seen


def theta_sweep(model, tokens: np.ndarray, *, context: int, candidates: Sequence[float] | None = None,
                search: bool = False, num: int = DEFAULT_CANDIDATES, span: float = DEFAULT_SPAN,
                iterations: int = 10, orig_context: int | None = None, mesh=None) -> dict:
    """Mean NLL of `model`'s weights on `tokens` ([batch, context]) at each candidate theta.

    Candidates: the given list, else `num` log-spaced around the scaling-law center, or with
    `search` a golden-section search over [center/span, center*span]. Returns {"points": [{theta,
    mean_nll}] sorted by theta, "best_theta", "best_nll", "center_theta", "trained_theta"}.
    """
    config = model.config
    if tokens.shape[1] != context:
        raise UserError(f"tokens have length {tokens.shape[1]} but --context is {context}")
    if candidates is not None and any(not (t > 0 and math.isfinite(t)) for t in candidates):
        raise UserError(f"candidates {list(candidates)} must be positive numbers")
    params = nnx.to_pure_dict(nnx.state(model))
    center = center_theta(config.rope_theta, context, orig_context or config.max_position_embeddings)

    def loss(theta: float) -> float:
        nll, _ = mean_nll(merge_params(config.replace(rope_theta=float(theta)), params), tokens, mesh)
        log(f"theta {theta:,.1f}: mean NLL {nll:.5f}")
        return nll

    if search:
        points = golden_section(loss, center / span, center * span, iterations)
    else:
        points = [(float(t), loss(t)) for t in (candidates or log_spaced(center, num, span))]
    points.sort()
    best = min(points, key=lambda p: p[1])
    return {"points": [{"theta": t, "mean_nll": v} for t, v in points], "best_theta": best[0], "best_nll": best[1],
            "center_theta": center, "trained_theta": config.rope_theta, "context": context,
            "method": "golden-section" if search else ("candidates" if candidates else "log-spaced")}


def sweep_table(result: dict) -> list[str]:
    """The sweep as printable lines: theta and mean NLL per point, then the best."""
    lines = [f"{'theta':>18} {'mean NLL':>9}"]
    lines += [f"{p['theta']:>18,.1f} {p['mean_nll']:>9.4f}{'  <- best' if p['theta'] == result['best_theta'] else ''}"
              for p in result["points"]]
    lines.append(f"best theta {result['best_theta']:,.1f} (scaling-law value {result['center_theta']:,.1f}, "
                 f"trained at {result['trained_theta']:,.1f})")
    return lines


def save_sweep(result: dict, directory: str | Path) -> dict[str, str]:
    """Writes `theta_sweep.json` and `theta_sweep.png` (loss against log theta) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {"json": str(directory / "theta_sweep.json"), "png": str(directory / "theta_sweep.png")}
    Path(files["json"]).write_text(json.dumps({**result, "files": files}, indent=1))
    points = result["points"]
    line_plot({"mean NLL": ([p["theta"] for p in points], [p["mean_nll"] for p in points])}, files["png"],
              f"theta sweep at context {result['context']:,} (scaling law {result['center_theta']:,.0f})",
              "RoPE theta", "mean NLL", logx=True, mark_x=result["best_theta"])
    return files


def stage_sweep(model, paths, *, context: int, sweep: ThetaSweepConfig, sequences: int, orig_context: int, mesh,
                out_dir: str | Path) -> float:
    """A recipe stage's `rope_theta: sweep` (the `TrainHooks.sweep_theta` the CLI passes to training):
    the search on the first `sequences` of the stage's data; process 0 writes and logs the table."""
    tokens = load_eval_data(paths, context, sequences, model.config.vocab_size)
    result = theta_sweep(model, tokens, context=context, num=sweep.num, span=sweep.span, search=sweep.search,
                         iterations=sweep.iterations, orig_context=orig_context, mesh=mesh)
    if jax.process_index() == 0:
        save_sweep(result, out_dir)
        for line in sweep_table(result):
            log(line)
    return result["best_theta"]
