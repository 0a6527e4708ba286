"""The long-context data mixture (Fu et al. 2024): keep every long document, keep a shorter one with
probability p, and draw sources in fixed proportions (SlimPajama's published mixture by default),
with chat data mixed in at a set ratio.
"""

from __future__ import annotations

import logging

import numpy as np

from lwm_jax.errors import UserError

log = logging.getLogger(__name__)

MIN_WEIGHT = 1e-6  # smallest share of the mixture a used source may have

# SlimPajama-627B token shares per `meta.redpajama_set_name` (Cerebras, 2023).
SLIMPAJAMA_MIXTURE: dict[str, float] = {
    "RedPajamaCommonCrawl": 0.522,
    "RedPajamaC4": 0.267,
    "RedPajamaGithub": 0.052,
    "RedPajamaBook": 0.042,
    "RedPajamaArXiv": 0.046,
    "RedPajamaWikipedia": 0.038,
    "RedPajamaStackExchange": 0.033,
}


def keep_documents(lengths: np.ndarray, rng: np.random.Generator, min_tokens: int, keep_prob: float) -> np.ndarray:
    """Boolean mask: documents of >= `min_tokens` always, shorter ones with probability `keep_prob`.

    One uniform draw is made per document, long or short, so the decision for a document depends
    only on the generator's state and its position in the stream.
    """
    draws = rng.random(len(lengths))
    return (np.asarray(lengths) >= min_tokens) | (draws < keep_prob)


def _text_weights(text: dict[str, dict], chat: dict[str, dict], weights: dict[str, float] | None) -> dict[str, float]:
    """The text sources' unnormalised weights: `weights` (checked against the sources), else
    SlimPajama's mixture when every text source is a SlimPajama set, else their token counts."""
    if weights is None:
        if text and all(n in SLIMPAJAMA_MIXTURE for n in text):
            return {n: SLIMPAJAMA_MIXTURE[n] for n in text}
        return {n: float(s["kept_tokens"]) for n, s in text.items()}
    unknown = sorted(set(weights) - set(text))
    chat_named = [n for n in unknown if n in chat]
    if chat_named:
        raise UserError(f"data.weights names chat source(s) {chat_named}; chat data is mixed in with "
                        "data.chat_ratio instead")
    if unknown:
        raise UserError(f"data.weights names unknown source(s) {unknown} (prepared text sources with "
                        f"data: {sorted(text) or 'none'})")
    missing = sorted(n for n in text if n not in weights)
    if missing:
        log.info("text sources without a weight are not used: %s", missing)
    return {n: weights.get(n, 0.0) for n in text}


def resolve_weights(sources: dict[str, dict], weights: dict[str, float] | None,
                    chat_ratio: float) -> dict[str, float]:
    """Normalised sampling weight per source name (sources with weight 0 left out).

    `sources` maps a name to its manifest entry (`kind` "text" or "chat", `kept_tokens`,
    `sequences`). Text sources share `1 - chat_ratio`: by `weights` when given, else by SlimPajama's
    mixture when every text source is a SlimPajama set, else by their token counts. Chat sources
    share `chat_ratio` by their token counts.
    """
    usable = {n: s for n, s in sources.items() if s.get("sequences", 0) > 0}
    text = {n: s for n, s in usable.items() if s["kind"] == "text"}
    chat = {n: s for n, s in usable.items() if s["kind"] == "chat"}
    text_w = _text_weights(text, chat, weights)
    chat_w = {n: float(s["kept_tokens"]) for n, s in chat.items()}

    if chat_ratio > 0 and not chat_w:
        raise UserError(f"data.chat_ratio={chat_ratio} but the prepared data holds no chat source "
                        "(prepare jsonl records with `messages`, or set data.chat_ratio: 0)")
    text_ratio = 1.0 - chat_ratio
    if text_ratio > 0 and sum(text_w.values()) <= 0:
        raise UserError("the prepared data holds no text source with a positive weight "
                        f"(text sources: {sorted(text) or 'none'}); set data.chat_ratio: 1 to train on chat only")
    out: dict[str, float] = {}
    for group, share in ((text_w, text_ratio), (chat_w, chat_ratio)):
        total = sum(group.values())
        if share <= 0 or total <= 0:
            continue
        for name, w in group.items():
            if w > 0:
                out[name] = share * w / total
    tiny = sorted(n for n, w in out.items() if w < MIN_WEIGHT)
    if tiny:
        raise UserError(f"source(s) {tiny} would get a share below {MIN_WEIGHT:g} of the mixture; give them a "
                        "larger weight or 0 to leave them out")
    return out
