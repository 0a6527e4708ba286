"""The one progress helper: library code reports long work only through here.

On a terminal, a progress bar; in a log file (stderr not a terminal: SLURM logs, `nohup`), plain
lines at a steady cadence (`LOG_EVERY_S`), never `\r` bars. Only the first process of a multi-host
run reports.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

LOG_EVERY_S = 30.0  # the longest silence between progress lines in a log file


def _main_process() -> bool:
    """False on every process but the first of a multi-host run (JAX already started there)."""
    if "jax" not in sys.modules:
        return True
    import jax  # already loaded (checked above): this lowest unit must not pull JAX in itself

    return jax.process_index() == 0


def interactive() -> bool:
    """Whether progress goes to a terminal (a bar) rather than a log file (plain lines)."""
    return sys.stderr.isatty()


def log(message: str) -> None:
    """A one-line status message on stderr from process 0 (stdout is kept for results and JSON)."""
    if _main_process():
        print(message, file=sys.stderr, flush=True)


class Ticker:
    """`due()` is True on its first call and then once `seconds` have passed since it last was."""

    def __init__(self, seconds: float = LOG_EVERY_S):
        self.seconds = seconds
        self._last: float | None = None

    def due(self) -> bool:
        now = time.monotonic()
        if self._last is None or now - self._last >= self.seconds:
            self._last = now
            return True
        return False


def eta(done: int, total: int, elapsed: float) -> str:
    """`12m05s`-style time left at the rate so far ('?' before any work is done)."""
    if done <= 0 or total <= done:
        return "0s" if total <= done else "?"
    left = int(elapsed / done * (total - done))
    hours, rest = divmod(left, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _lines(items: Iterable, desc: str, total: int | None) -> Iterator:
    """`items`, with a line `desc: i/total, ETA` on stderr when `Ticker` is due and at the end."""
    ticker, start = Ticker(), time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        if ticker.due() or (total is not None and done == total):
            of = f"/{total}" if total is not None else ""
            left = f", ETA {eta(done, total, time.monotonic() - start)}" if total is not None else ""
            log(f"{desc}: {done}{of}{left}")


def progress(items: Iterable, desc: str, total: int | None = None, **kwargs) -> Iterable:
    """`items` with progress on stderr: a bar on a terminal, plain lines in a log file; nothing on
    processes other than the first."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if not _main_process():
        return items
    if not interactive():
        return _lines(items, desc, total)
    return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True, **kwargs)
