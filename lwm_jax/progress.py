"""The one progress helper: library code reports long work only through here."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def _main_process() -> bool:
    """False on every process but the first of a multi-host run (JAX already started there)."""
    if "jax" not in sys.modules:
        return True
    import jax  # already loaded (checked above): this lowest unit must not pull JAX in itself

    return jax.process_index() == 0


def progress(items: Iterable, desc: str, total: int | None = None, **kwargs) -> Iterable:
    """Wraps `items` in a progress bar on stderr (hidden off a terminal and on all but process 0)."""
    return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=not (sys.stderr.isatty() and _main_process()), **kwargs)


def log(message: str) -> None:
    """A one-line status message on stderr from process 0 (stdout is kept for results and JSON)."""
    if _main_process():
        print(message, file=sys.stderr, flush=True)
