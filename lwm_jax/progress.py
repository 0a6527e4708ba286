"""The one progress helper: library code reports long work only through here.

On a terminal, a progress bar; in a log file (stderr not a terminal: SLURM logs, `nohup`), plain
lines at a steady cadence (`LOG_EVERY_S`), never `\r` bars. Only the first process of a multi-host
run reports.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

# The longest silence between progress lines in a log file (LWM_JAX_LOG_EVERY_S changes it).
LOG_EVERY_S = float(os.environ.get("LWM_JAX_LOG_EVERY_S", "30"))


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
    """`due()` is True once `seconds` have passed since it was made or last was True (with
    `first=True`, also on its first call)."""

    def __init__(self, seconds: float = LOG_EVERY_S, first: bool = True):
        self.seconds = seconds
        self._last: float | None = None if first else time.monotonic()

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


class Counter:
    """Progress counted by hand (`update`, `close`): a bar on a terminal; in a log file a line every
    `LOG_EVERY_S` (and at the end once a line was written, so short work stays quiet); nothing on
    processes other than the first."""

    def __init__(self, desc: str, total: int | None = None, done: int = 0):
        self.desc, self.total, self.done, self.initial = desc, total, done, done
        self.start, self.ticker, self.note, self.lines = time.monotonic(), Ticker(first=False), "", 0
        self.bar = None
        if _main_process() and interactive():
            self.bar = tqdm(desc=desc, total=total, initial=done, file=sys.stderr, leave=False, dynamic_ncols=True)
        self.quiet = not _main_process()

    def update(self, n: int = 1, note: str = "", line: bool = False) -> None:
        """Counts `n` more done; `note` (e.g. "loss 2.31") goes beside the count; `line`: write the
        log-file line now, whatever the clock says."""
        self.done += n
        self.note = note or self.note
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note, refresh=False)
        elif not self.quiet and (self.ticker.due() or line or (self.lines and self.done == self.total)):
            self.lines += 1
            of = f"/{self.total}" if self.total is not None else ""
            left = (f", ETA {eta(self.done - self.initial, self.total - self.initial, time.monotonic() - self.start)}"
                    if self.total else "")
            log(f"{self.desc} {self.done}{of}{left}" + (f"; {self.note}" if self.note else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress(items: Iterable, desc: str, total: int | None = None) -> Iterator:
    """`items`, counted by a `Counter` as they are taken."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    counter = Counter(desc, total)
    try:
        for item in items:
            yield item
            counter.update()
    finally:
        counter.close()
