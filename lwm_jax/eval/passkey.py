"""The classic passkey retrieval probe (Mohtashami & Jaggi 2023): a random 5-digit key hidden in
repeated filler text at several depths, scored teacher-forced (and generated, when asked) by length.
"""

from __future__ import annotations

from collections.abc import Sequence

from lwm_jax.data.synthetic import passkey_sample
from lwm_jax.eval.niah import check_grid, summarize
from lwm_jax.eval.probes import ChatWrap, build_to_length, cell_seed, probe_from_sample
from lwm_jax.eval.scoring import LogitsFn, run_grid

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def passkey_eval(logits_fn: LogitsFn, tokenizer, *, lengths: Sequence[int], depths: Sequence[float] = DEFAULT_DEPTHS,
                 samples: int = 1, seed: int = 0, chat: ChatWrap | None = None, bos_id: int | None = None,
                 digits: int = 5, generate_fn=None) -> dict:
    """Passkey accuracy per (length, depth) cell and by length (mean over depths and samples)."""
    check_grid(lengths, depths)

    def make(length: int, depth: float, k: int):
        s = cell_seed(seed, length, depth, k)
        return build_to_length(lambda n: probe_from_sample(
            passkey_sample(tokenizer, n, depth, s, bos_id=None if chat else bos_id, digits=digits), chat), length)

    cells = run_grid(make, logits_fn, lengths=lengths, depths=depths, samples=samples, desc="passkey",
                     generate_fn=generate_fn, tokenizer=tokenizer)
    return summarize("passkey", cells, generate_fn is not None, chat=chat is not None, seed=seed)
