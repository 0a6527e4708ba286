"""`lwm-jax generate`: KV-cache generation from a checkpoint, over `lwm_jax.generate.generate_command`.
Parsing (the sampling options) and printing only.
"""

from __future__ import annotations

from lwm_jax.cli.common import command, mesh_from_args, print_result
from lwm_jax.config import ATTENTION_IMPLS
from lwm_jax.errors import UserError
from lwm_jax.generate import generate_command


def cmd_generate(args) -> int:
    """Prefills the prompt (with ring attention over sp when --mesh has sp > 1) and decodes with a
    KV cache sharded over sp, each device's partial softmax combined across sp (flash-decoding).
    Stops at the model's EOS ids and, with --tokenizer, <|eot_id|>. A prompt plus --max-new-tokens
    past the checkpoint's max_position_embeddings (its trained length) runs with a warning on
    stderr: the model extrapolates there."""
    sample = args.temperature is not None or args.top_p is not None
    if sample and args.greedy:
        raise UserError("--greedy cannot be combined with --temperature / --top-p (they sample)")
    result = generate_command(args.ckpt, prompt=args.prompt, tokens=args.tokens, tokenizer=args.tokenizer,
                              chat=args.chat, max_new_tokens=args.max_new_tokens, greedy=not sample,
                              temperature=1.0 if args.temperature is None else args.temperature,
                              top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed,
                              mesh=mesh_from_args(args), attention=args.attention,
                              device_memory_gib=args.device_memory)
    text = result.get("text")
    print_result(args, result, [text if text is not None else " ".join(map(str, result["new_tokens"]))])
    return 0


def register(sub) -> None:
    """Adds `generate`."""
    p = command(sub, "generate", cmd_generate, help="KV-cache generation from a checkpoint",
                epilog="A prompt of any length runs on any mesh: the prefill pads it at its end to the length the "
                       "attention's layout accepts, the padding a segment of its own that the prompt never attends "
                       "to; decoding overwrites it in the cache before it could be seen.")
    p.add_argument("ckpt", help="checkpoint folder (latest step is used)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text (needs --tokenizer)")
    src.add_argument("--tokens", metavar="FILE.npy", help="prompt token ids [seq] or [1, seq]")
    p.add_argument("--tokenizer", metavar="DIR", help="Hugging Face tokenizer folder (tokenizer.json)")
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt as a user turn with the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="tokens to generate (default 256)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    p.add_argument("--temperature", type=float, metavar="T", help="sample at this temperature (default 1 with --top-p)")
    p.add_argument("--top-p", type=float, metavar="P", help="sample from the top-p mass (default 1 with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--mesh", help="device mesh, e.g. dp=2,sp=4 (product = device count)")
    p.add_argument("--attention", choices=ATTENTION_IMPLS,
                   help="prefill attention (default: ring when the mesh has sp > 1, else blockwise)")
    p.add_argument("--device-memory", type=float, metavar="GIB",
                   help="memory of one device for the fits check (default: what the device reports)")
