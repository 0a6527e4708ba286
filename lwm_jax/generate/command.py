"""`lwm-jax generate` as a library call: the prompt encoded (optionally as a chat turn), checked against
the opened checkpoint and the mesh before the weights are read, then generated.
"""

from __future__ import annotations

import numpy as np

from lwm_jax.data.chat import ChatTemplate
from lwm_jax.data.tokenize import get_tokenizer, load_tokenizer_info
from lwm_jax.errors import UserError
from lwm_jax.generate.cache import cache_spec
from lwm_jax.generate.loop import check_prompt, generate
from lwm_jax.generate.sampling import check_sampling
from lwm_jax.model.opened import open_checkpoint


def encode_prompt(text: str, tokenizer_dir, chat: bool) -> tuple[list[int], object]:
    """`(ids, tokenizer)`: BOS + the text, or with `chat` the text as one user turn rendered by the
    tokenizer's chat template with the assistant header appended (the template writes BOS)."""
    info = load_tokenizer_info(tokenizer_dir)
    tok = get_tokenizer(info.tokenizer_file)
    if chat:
        if info.chat_template is None:
            raise UserError(f"tokenizer {info.directory} has no chat template (no chat_template in "
                            "tokenizer_config.json, no chat_template.jinja); drop --chat or use a chat tokenizer")
        template = ChatTemplate(info.chat_template, dict(info.special_tokens))
        text = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False).ids
    if not ids or ids[0] != info.bos_id:
        ids = [info.bos_id, *ids]
    return ids, tok


def generate_command(ckpt, *, prompt: str | None = None, tokens=None, tokenizer=None, chat: bool = False,
                     max_new_tokens: int = 256, greedy: bool = True, temperature: float = 1.0,
                     top_p: float = 1.0, seed: int = 0, mesh=None, attention: str | None = None,
                     device_memory_gib: float | None = None) -> dict:
    """`lwm-jax generate`: `{"new_tokens": [...], "text": ...}` (text when a tokenizer is given).

    Prompt, tokenizer and lengths are checked against the checkpoint's config and the mesh
    before the model is loaded or anything compiles.
    """
    if prompt is not None and tokenizer is None:
        raise UserError("--prompt needs --tokenizer DIR to encode it (or give --tokens FILE.npy)")
    if chat and prompt is None:
        raise UserError("--chat applies the chat template to --prompt TEXT; it cannot wrap --tokens")
    check_sampling(greedy, temperature, top_p)
    tok = None
    if prompt is not None:
        ids, tok = encode_prompt(prompt, tokenizer, chat)
    else:
        path = str(tokens)
        try:
            ids = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read prompt tokens {path}: {err}") from None
        if tokenizer is not None:
            tok = get_tokenizer(load_tokenizer_info(tokenizer).tokenizer_file)
    opened = open_checkpoint(ckpt, mesh, attention=attention)
    prompt_ids = check_prompt(ids, opened.config.vocab_size)
    memory = None if device_memory_gib is None else int(device_memory_gib * 2**30)
    cache_spec(opened.config, len(prompt_ids), max_new_tokens, mesh, memory)  # fails before loading
    opened.check_context(len(prompt_ids) + max_new_tokens, what="prompt + new tokens")
    new = generate(opened.model(), prompt_ids, max_new_tokens=max_new_tokens, greedy=greedy,
                   temperature=temperature, top_p=top_p, seed=seed, stop_ids=opened.stop_ids(tok), mesh=mesh,
                   device_memory=memory)
    result: dict = {"new_tokens": new}
    if tok is not None:
        result["text"] = tok.decode(new, skip_special_tokens=True)
    return result
