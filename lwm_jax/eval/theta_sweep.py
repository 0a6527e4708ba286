"""The empirical RoPE search: long-context loss of a checkpoint at candidate thetas (or values of one
scalar of its RoPE scaling method, such as YaRN's factor), without training (same weights, only
that number changed), over log-spaced candidates around the scaling-law theta (or the method's own
value) or by golden-section search in log space; returns every point and the best.
"""

from __future__ import annotations

import dataclasses
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
from lwm_jax.outputs import staged_folder
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


def with_value(config, param: str, value: float):
    """`config` with `param` (`rope_theta` or a field of its `rope_scaling`) set to `value`."""
    if param == "rope_theta":
        return config.replace(rope_theta=float(value))
    return config.replace(rope_scaling=dataclasses.replace(config.rope_scaling, **{param: float(value)}))


def theta_sweep(model, tokens: np.ndarray, *, context: int, candidates: Sequence[float] | None = None,
                search: bool = False, num: int = DEFAULT_CANDIDATES, span: float = DEFAULT_SPAN,
                iterations: int = 10, orig_context: int | None = None, mesh=None, param: str = "rope_theta") -> dict:
    """Mean NLL of `model`'s weights on `tokens` ([batch, context], any batch and context: `mean_nll`
    pads them to the mesh's layout and masks the padding) at each candidate value of `param`:
    `rope_theta`, or a real-valued field of the model's `rope_scaling` (e.g. `factor`).

    Candidates: the given list, else `num` log-spaced around the center (the scaling-law theta; the
    model's own value of any other field), or with `search` a golden-section search over
    [center/span, center*span]. Returns {"param", "points": [{value, mean_nll}] sorted by value,
    "best_value", "best_nll", "center_value", "trained_value", ...}; a theta sweep also names them
    "theta", "best_theta", "center_theta" and "trained_theta".
    """
    config = model.config
    if tokens.shape[1] != context:
        raise UserError(f"tokens have length {tokens.shape[1]} but --context is {context}")
    if candidates is not None and any(not (t > 0 and math.isfinite(t)) for t in candidates):
        raise UserError(f"candidates {list(candidates)} must be positive numbers")
    if param == "rope_theta":
        trained = config.rope_theta
        center = center_theta(config.rope_theta, context, orig_context or config.max_position_embeddings)
    else:
        trained = getattr(config.rope_scaling, param, None) if config.rope_scaling is not None else None
        if trained is None:
            raise UserError(f"cannot sweep {param}: the model's rope_scaling "
                            f"({config.rope_scaling.rope_type if config.rope_scaling else 'none'}) does not set it")
        center = float(trained)
    params = nnx.to_pure_dict(nnx.state(model))

    def loss(value: float) -> float:
        nll, _ = mean_nll(merge_params(with_value(config, param, value), params), tokens, mesh)
        log(f"{param} {value:,.4g}: mean NLL {nll:.5f}")
        return nll

    if search:
        points = golden_section(loss, center / span, center * span, iterations)
    else:
        points = [(float(t), loss(t)) for t in (candidates or log_spaced(center, num, span))]
    points.sort()
    best = min(points, key=lambda p: p[1])
    result = {"param": param, "points": [{"value": t, "mean_nll": v} for t, v in points], "best_value": best[0],
              "best_nll": best[1], "center_value": center, "trained_value": float(trained), "context": context,
              "method": "golden-section" if search else ("candidates" if candidates else "log-spaced")}
    if param == "rope_theta":
        result["points"] = [{"theta": p["value"], **p} for p in result["points"]]
        result.update(best_theta=best[0], center_theta=center, trained_theta=float(trained))
    return result


def _label(result: dict) -> str:
    return "theta" if result.get("param", "rope_theta") == "rope_theta" else result["param"]


def sweep_table(result: dict) -> list[str]:
    """The sweep as printable lines: the swept value and mean NLL per point, then the best."""
    name, fmt = _label(result), (",.1f" if _label(result) == "theta" else ".4g")
    best = result.get("best_value", result.get("best_theta"))
    lines = [f"{name:>18} {'mean NLL':>9}"]
    for p in result["points"]:
        value = p.get("value", p.get("theta"))
        lines.append(f"{value:>18{fmt}} {p['mean_nll']:>9.4f}{'  <- best' if value == best else ''}")
    center = "scaling-law value" if name == "theta" else "recipe value"
    lines.append(f"best {name} {best:{fmt}} ({center} {result.get('center_value', result.get('center_theta')):{fmt}}, "
                 f"trained at {result.get('trained_value', result.get('trained_theta')):{fmt}})")
    return lines


def save_sweep(result: dict, directory: str | Path) -> dict[str, str]:
    """Writes `theta_sweep.json` and `theta_sweep.png` (loss against log theta) into `directory`,
    both or neither (`staged_folder`)."""
    directory = Path(directory)
    files = {"json": str(directory / "theta_sweep.json"), "png": str(directory / "theta_sweep.png")}
    points, name = result["points"], _label(result)
    values = [p.get("value", p.get("theta")) for p in points]
    center = result.get("center_value", result.get("center_theta"))
    title = (f"theta sweep at context {result['context']:,} (scaling law {center:,.0f})" if name == "theta" else
             f"{name} sweep at context {result['context']:,} (recipe value {center:.4g})")
    with staged_folder(directory) as stage:
        (stage / "theta_sweep.json").write_text(json.dumps({**result, "files": files}, indent=1))
        line_plot({"mean NLL": (values, [p["mean_nll"] for p in points])}, stage / "theta_sweep.png", title,
                  "RoPE theta" if name == "theta" else f"RoPE {name}", "mean NLL", logx=True,
                  mark_x=result.get("best_value", result.get("best_theta")))
    return files


def stage_sweep(model, paths, *, context: int, sweep: ThetaSweepConfig, sequences: int, orig_context: int, mesh,
                out_dir: str | Path, param: str = "rope_theta") -> float:
    """A recipe stage's `rope_theta: sweep` or `sweep: FIELD` (the `TrainServices.sweep_theta` the CLI
    passes to training): the search on the first `sequences` of the stage's data; process 0 writes
    and logs the table. Returns the best value."""
    tokens = load_eval_data(paths, context, sequences, model.config.vocab_size)
    result = theta_sweep(model, tokens, context=context, num=sweep.num, span=sweep.span, search=sweep.search,
                         iterations=sweep.iterations, orig_context=orig_context, mesh=mesh, param=param)
    if jax.process_index() == 0:
        save_sweep(result, out_dir)
        for line in sweep_table(result):
            log(line)
    return result["best_value"]
