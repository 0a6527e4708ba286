"""Chat records (`messages` with role/content) rendered through the tokenizer's own Jinja chat
template, with a per-token loss mask that is 1 exactly on the assistant replies (their content and
end-of-turn token) and 0 on everything else, found by rendering conversation prefixes.
"""

from __future__ import annotations

import functools
import json

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from lwm_jax.errors import UserError


class ChatTemplateError(ValueError):
    """The template does not render conversation prefixes as prefixes of the whole conversation."""


class ChatTemplate:
    """A compiled chat template (sandboxed Jinja, as Hugging Face renders it)."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as err:
            raise UserError(f"chat template does not compile: {err}") from None
        self._special = dict(special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self._special)

    @functools.cached_property
    def _always_prompt(self) -> str:
        """The generation prompt a template appends even when not asked (Llama-3's first template)."""
        probe = [{"role": "user", "content": "x"}]
        if self.render(probe, True) != self.render(probe, False):
            return ""
        try:
            return self.render([], True)
        except Exception:  # a template that needs messages: assume nothing is appended
            return ""

    def _render_trimmed(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        text = self.render(messages, add_generation_prompt)
        tail = self._always_prompt
        if not add_generation_prompt and tail and text.endswith(tail):
            text = text[: -len(tail)]
        return text

    def render_with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The training text of a conversation and the character spans of its assistant replies.

        Reply i spans from the end of `render(messages[:i], add_generation_prompt=True)` (the
        prompt up to the assistant header) to the end of `render(messages[:i+1])` (the reply and
        its end-of-turn marker). A generation prompt that the template appends unasked is dropped.
        """
        full = self._render_trimmed(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise ChatTemplateError("a conversation cannot open with an assistant reply")
            prefix = self._render_trimmed(messages[:i], add_generation_prompt=True)
            upto = self._render_trimmed(messages[: i + 1])
            if not (full.startswith(upto) and upto.startswith(prefix)):
                raise ChatTemplateError("chat template output for a conversation prefix is not a prefix of the "
                                        "whole conversation")
            spans.append((len(prefix), len(upto)))
        return full, spans


def spans_to_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """uint8 mask over tokens: 1 where a token starts inside one of the character spans."""
    starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(offsets), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (starts < b)
    return mask.astype(np.uint8)


def encode_chats(tokenizer, template: ChatTemplate, conversations: list[list[dict]],
                 bos_id: int) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Token ids and assistant loss mask of each conversation (None where the template fails).

    The rendered text carries the template's special tokens (BOS, headers, `<|eot_id|>`), which the
    tokenizer matches as added tokens; BOS is prepended only if the template did not write it.
    """
    rendered: list[tuple[str, list] | None] = []
    for messages in conversations:
        try:
            rendered.append(template.render_with_spans(messages))
        except Exception:  # a template error on one record must not stop the run
            rendered.append(None)
    texts = [r[0] for r in rendered if r is not None]
    encodings = iter(tokenizer.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for r in rendered:
        if r is None:
            out.append(None)
            continue
        enc = next(encodings)
        ids = np.asarray(enc.ids, dtype=np.int32)
        mask = spans_to_mask(enc.offsets, r[1])
        if len(ids) == 0 or ids[0] != bos_id:
            ids = np.concatenate([[bos_id], ids]).astype(np.int32)
            mask = np.concatenate([[0], mask]).astype(np.uint8)
        out.append((ids, mask))
    return out
