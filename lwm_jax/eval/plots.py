"""PNG figures of the evaluations (matplotlib, Agg backend, no display): the needle heatmap in the
style of the seed model's card, accuracy by length, loss by position and the theta sweep.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

# The red -> yellow -> green of the Kamradt / Gradient needle heatmaps.
NIAH_COLORS = ("#F0496E", "#EBB839", "#0CD79F")


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib  # on first use: slow to import, and Agg must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot picks its backend when imported

    return plt


def short_length(n: int) -> str:
    """1024 -> '1K', 1048576 -> '1M', 300 -> '300'."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % (size // 8) == 0:
            value = n / size
            return f"{value:g}{unit}"
    return str(n)


def niah_heatmap(cells: list[dict], path: str | Path, title: str, key: str = "score", ykey: str = "depth") -> Path:
    """Heatmap of `key` per cell: x context length, y depth % (0 at the top) or task (`ykey`), red (0)
    to green (1)."""
    from matplotlib.colors import LinearSegmentedColormap  # matplotlib is imported on first use (see pyplot)

    plt = pyplot()
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells}) if ykey == "depth" else list(dict.fromkeys(c[ykey] for c in cells))
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c[ykey]), lengths.index(c["length"])] = c[key]
    cmap = LinearSegmentedColormap.from_list("niah", NIAH_COLORS)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(lengths) + 3), max(4.0, 0.4 * len(depths) + 2)))
    image = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color="black")
    ax.set_xticks(range(len(lengths)), [short_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:g}" for d in depths] if ykey == "depth" else depths)
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Depth percent" if ykey == "depth" else ykey.capitalize())
    ax.set_title("\n".join(textwrap.wrap(title, 64)), fontsize=10)  # long titles (model, stage, theta) wrap
    fig.colorbar(image, ax=ax, label="Score")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_plot(series: dict[str, tuple[list[float], list[float]]], path: str | Path, title: str, xlabel: str,
              ylabel: str, logx: bool = False, mark_x: float | None = None) -> Path:
    """One line per series name ((x, y) values); an optional vertical marker at `mark_x`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", label=name)
    if mark_x is not None:
        ax.axvline(mark_x, color="grey", linestyle="--", linewidth=1)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
