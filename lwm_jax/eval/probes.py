"""Retrieval probes (NIAH, passkey, RULER) as token ids: a probe is prompt + answer built to an
exact total length, optionally wrapped in a chat template, with a per-cell seed for every sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from lwm_jax.data.chat import ChatTemplate
from lwm_jax.data.synthetic import fit_to_length
from lwm_jax.errors import UserError

_CHAT_MARK = "\x00LWM_CONTENT\x00"


@dataclasses.dataclass(frozen=True)
class Probe:
    """One scored prompt: `prompt` then `answer_ids` is the whole sequence the model sees."""

    task: str
    prompt: np.ndarray  # int32 [prompt_len]
    answer: str
    answer_ids: list[int]
    needle_start: int  # token span of the (first) needle inside `prompt`
    needle_end: int
    depth: float
    actual_depth: float

    @property
    def length(self) -> int:
        """Total tokens the model reads when teacher-forced: prompt + answer."""
        return len(self.prompt) + len(self.answer_ids)


class ChatWrap:
    """The user turn and assistant header of a chat template, as token ids around a prompt body."""

    def __init__(self, tokenizer, template_source: str, special_tokens: dict[str, str]):
        text = ChatTemplate(template_source, special_tokens).render(
            [{"role": "user", "content": _CHAT_MARK}], add_generation_prompt=True)
        if text.count(_CHAT_MARK) != 1:
            raise UserError("the chat template does not render a user message verbatim; "
                            "cannot build probes with --chat")
        pre, post = text.split(_CHAT_MARK)
        self.tokenizer = tokenizer
        self.pre = tokenizer.encode(pre, add_special_tokens=False).ids
        self.post = tokenizer.encode(post, add_special_tokens=False).ids

    def wrap(self, body: list[int], question: str) -> tuple[list[int], int]:
        """(ids, offset of `body` in ids): `question` split at its first '? ' into the user turn
        (the question) and an assistant prefill (the answer prefix), so the answer follows it."""
        ask, sep, prefill = question.partition("? ")
        ask = ask + "?" if sep else ask
        enc = lambda s: self.tokenizer.encode(s, add_special_tokens=False).ids
        ids = self.pre + body + enc("\n" + ask) + self.post + (enc(prefill) if sep else [])
        return ids, len(self.pre)


def chat_wrap_for(tokenizer, info, chat: bool) -> ChatWrap | None:
    """The `ChatWrap` of a tokenizer when `chat` is asked; a UserError when it has no template."""
    if not chat:
        return None
    if info.chat_template is None:
        raise UserError(f"tokenizer {info.directory} has no chat template (tokenizer_config.json chat_template or "
                        "chat_template.jinja); drop --chat or use a tokenizer that has one")
    return ChatWrap(tokenizer, info.chat_template, dict(info.special_tokens))


def probe_from_sample(sample, chat: ChatWrap | None) -> Probe:
    """A `Probe` from a `SyntheticSample` (plain: its ids as they are; chat: wrapped)."""
    if chat is None:
        return Probe(sample.task, np.asarray(sample.ids, np.int32), sample.answer, list(sample.answer_ids),
                     sample.needle_start, sample.needle_end, sample.depth, sample.actual_depth)
    ids, offset = chat.wrap(np.asarray(sample.ids[: sample.question_start]).tolist(), sample.question)
    return Probe(sample.task, np.asarray(ids, np.int32), sample.answer, list(sample.answer_ids),
                 sample.needle_start + offset, sample.needle_end + offset, sample.depth, sample.actual_depth)


def build_to_length(make: Callable[[int], Probe], length: int) -> Probe:
    """The probe whose total length (prompt + answer) is `length`: built once at `length`, then
    rebuilt with the haystack shortened by what the template, question and answer added."""
    return fit_to_length(make, length, total=lambda probe: probe.length)


def cell_seed(seed: int, *parts: float) -> int:
    """A per-sample seed from the run seed and the cell coordinates (stable across runs)."""
    return int(np.random.SeedSequence([seed, *(int(round(p * 1000)) for p in parts)]).generate_state(1)[0])
