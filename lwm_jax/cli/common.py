"""Helpers shared by the `lwm-jax` command groups: result printing, the mesh and runtime options.

Every group module builds its parsers and handlers from these, so the options read the same everywhere.
"""

from __future__ import annotations

import argparse
import inspect
import json

import jax

from lwm_jax.config import ATTENTION_IMPLS, ATTENTION_KERNELS, MeshConfig
from lwm_jax.parallel.mesh import make_mesh


def print_result(args, result: dict, lines: list[str]) -> None:
    """Prints human-readable lines, or with `--json` one JSON object as the last line (process 0 only)."""
    if jax.process_index() != 0:
        return
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        print("\n".join(lines))


def mesh_from_args(args):
    """The mesh named by `--mesh` (None when absent)."""
    if not getattr(args, "mesh", None):
        return None
    return make_mesh(MeshConfig.parse(args.mesh))


def runtime_from_args(args) -> dict:
    """The `--attention`, `--dtype` and `--attention-kernel` overrides that were given, as keyword arguments."""
    runtime = {}
    if getattr(args, "attention", None):
        runtime["attention"] = args.attention
    if getattr(args, "dtype", None):
        runtime["dtype"] = args.dtype
    if getattr(args, "attention_kernel", None):
        runtime["attention_kernel"] = args.attention_kernel
    return runtime


def add_runtime_options(p, dtype: bool = True) -> None:
    """`--attention`, `--attention-kernel`, `--mesh` (and `--dtype`): how a checkpoint runs, shared
    by the evaluations."""
    p.add_argument("--attention", choices=ATTENTION_IMPLS,
                   help="attention implementation (default: the checkpoint's)")
    p.add_argument("--attention-kernel", choices=ATTENTION_KERNELS,
                   help="per-block kernel of blockwise/ring: auto picks cuDNN (GPU, bf16) or the pure-JAX "
                        "xla kernel (default: the checkpoint's)")
    p.add_argument("--mesh", help="device mesh, e.g. dp=2,sp=4 (product = device count)")
    if dtype:
        p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)")


def add_json(p) -> None:
    """`--json`: print one JSON object (see `print_result`)."""
    p.add_argument("--json", action="store_true", help="print one JSON object")


def command(sub, name: str, func, help: str, **parser_kwargs) -> argparse.ArgumentParser:
    """The sub-command `name` running `func`, described by `func`'s docstring, with `--json`."""
    p = sub.add_parser(name, help=help, description=inspect.getdoc(func), **parser_kwargs)
    add_json(p)
    p.set_defaults(func=func)
    return p
