"""The one progress helper: library code reports long work only through here."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def progress(items: Iterable, desc: str, total: int | None = None, **kwargs) -> Iterable:
    """Wraps `items` in a progress bar on stderr (hidden when stderr is not a terminal)."""
    return tqdm(items, desc=desc, total=total, file=sys.stderr, disable=not sys.stderr.isatty(),
                leave=False, dynamic_ncols=True, **kwargs)


def log(message: str) -> None:
    """A one-line status message on stderr (stdout is kept for results and JSON)."""
    print(message, file=sys.stderr, flush=True)
