"""`lwm-jax import-hf`, `export-hf` and `export-gguf`: checkpoint conversion to and from Hugging Face
folders and GGUF files, over `lwm_jax.convert`.
"""

from __future__ import annotations

from lwm_jax.cli.common import command, mesh_from_args, print_result
from lwm_jax.convert.gguf import export_checkpoint
from lwm_jax.convert.hf import export_hf_checkpoint, import_hf_checkpoint, parse_size


def cmd_import_hf(args) -> int:
    """Reads config.json and safetensors weights (single or sharded with
    model.safetensors.index.json) and writes an orbax checkpoint with metadata, one param leaf in
    memory at a time. Pickle (.bin) weights are refused."""
    r = import_hf_checkpoint(args.hf_dir, args.ckpt, mesh=mesh_from_args(args), force=args.force)
    print_result(args, r, [f"imported {r['params']:,} params (theta {r['rope_theta']:,.0f}) into {r['checkpoint']}"])
    return 0


def cmd_export_hf(args) -> int:
    """Writes safetensors (sharded past --max-shard-size, with an index), config.json with the
    checkpoint's rope_theta and max_position_embeddings, generation_config.json and, with
    --tokenizer, the tokenizer files, reading one param leaf at a time."""
    r = export_hf_checkpoint(args.ckpt, args.out_dir, stage=args.stage, dtype=args.dtype, tokenizer_dir=args.tokenizer,
                             max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
    print_result(args, r, [f"wrote Hugging Face model ({r['dtype']}) to {r['out_dir']}"])
    return 0


def cmd_export_gguf(args) -> int:
    """Writes one GGUF file for llama.cpp (llama architecture): the weights (f32, f16 or q8_0; norms
    stay f32; with q8_0 a matrix whose rows are not whole 32-value blocks stays f16, as llama.cpp's
    quantizer leaves it, and is named), context length = the checkpoint's max_position_embeddings, rope freq base = its
    theta, and the Llama-3 tokenizer from DIR (BPE tokens, merges, special ids, chat template). The
    file is written under a temporary name and renamed when complete."""
    r = export_checkpoint(args.ckpt, args.out, args.tokenizer, type=args.type, force=args.force)
    size = r["file_bytes"] / 2**20
    lines = [f"wrote {r['type']} GGUF ({r['tensors']} tensors, {size:,.1f} MiB) to {r['path']}: "
             f"context {r['context_length']:,}, rope base {r['rope_theta']:,.0f}"]
    by_row: dict[int, list[str]] = {}
    for name, row in r["f16_fallbacks"].items():
        by_row.setdefault(row, []).append(name)
    lines += [f"stayed F16 (rows of {row} values are not whole 32-value Q8_0 blocks): {', '.join(names)}"
              for row, names in sorted(by_row.items())]
    print_result(args, r, lines)
    return 0


def _add_import_hf(sub) -> None:
    p = command(sub, "import-hf", cmd_import_hf, help="Hugging Face Llama folder -> lwm-jax orbax checkpoint")
    p.add_argument("hf_dir", help="Hugging Face model folder")
    p.add_argument("ckpt", help="output checkpoint folder (must not exist or be empty)")
    p.add_argument("--mesh", help="shard params while importing, e.g. fsdp=8")
    p.add_argument("--force", action="store_true", help="write into a non-empty checkpoint folder")


def _add_export_hf(sub) -> None:
    p = command(sub, "export-hf", cmd_export_hf, help="lwm-jax checkpoint -> Hugging Face Llama folder")
    p.add_argument("ckpt", help="checkpoint folder (latest step is used), or a train workdir with --stage")
    p.add_argument("out_dir", help="output folder (must not exist or be empty unless --force)")
    p.add_argument("--stage", metavar="NAME", help="CKPT is a train workdir: export this stage's last checkpoint "
                                                   "and write a model card (README.md) with its seq_len and theta")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                   help="weight dtype in the safetensors files (default bfloat16)")
    p.add_argument("--tokenizer", metavar="DIR", help="copy tokenizer.json / tokenizer_config.json from DIR")
    p.add_argument("--max-shard-size", default="5GB", help="split weights into files of at most this size")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")


def _add_export_gguf(sub) -> None:
    p = command(sub, "export-gguf", cmd_export_gguf, help="lwm-jax checkpoint -> GGUF file for llama.cpp")
    p.add_argument("ckpt", help="checkpoint folder (latest step is used)")
    p.add_argument("out", metavar="OUT.gguf", help="output file (must not exist unless --force)")
    p.add_argument("--tokenizer", metavar="DIR", required=True,
                   help="Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json); "
                        "its vocab must match the model's")
    p.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f16",
                   help="weight type of the matrices (default f16); q8_0 is 8-bit, about half of f16's size")
    p.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")


def register(sub) -> None:
    """Adds `import-hf`, `export-hf` and `export-gguf`."""
    _add_import_hf(sub)
    _add_export_hf(sub)
    _add_export_gguf(sub)
