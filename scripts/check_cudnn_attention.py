"""The fused attention kernels against the dense reference, on one GPU (bfloat16, forward and
gradients): cuDNN's whole call with GQA (8 query heads on 2 KV heads, causal and not), blockwise /
ring attention that dispatch to it, and the Pallas kernel (Triton) through blockwise and the ring
(with packed documents). Only the fused kernel needs a GPU, so this is a device check
(`scripts/device_check.sh` runs it), not a test: the same public call's XLA implementation and
the cuDNN kernel's chunk pairs (the pure-JAX blocks) are tested on CPU in tests/test_attention.py.

    python scripts/check_cudnn_attention.py     # exit 1 when a check misses, 2 without a GPU
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

BF16_RTOL = 2e-2  # max abs error / max abs reference value, bfloat16 inputs
SHAPES = [(2, 1024, 8, 128), (2, 1024, 2, 128), (2, 1024, 2, 128), (2, 1024, 8, 128)]  # q, k, v, dout


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


def out_and_grads(fn, q, k, v, dout):
    """`fn`'s output and its q, k, v gradients under the loss sum(out * dout), jitted."""
    loss = lambda q, k, v: (lambda o: (jnp.sum(o.astype(jnp.float32) * dout.astype(jnp.float32)), o))(fn(q, k, v))
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out, *grads)


def checks() -> dict[str, float]:
    """Worst relative error over output and gradients, per path."""
    from lwm_jax.attention.blockwise import blockwise_attention
    from lwm_jax.attention.kernels import cudnn
    from lwm_jax.attention.reference import reference_attention
    from lwm_jax.attention.ring import ring_attention
    from lwm_jax.config import MeshConfig
    from lwm_jax.parallel.mesh import make_mesh

    q, k, v, dout = (jnp.asarray(np.random.default_rng(2).standard_normal(s, np.float32), jnp.bfloat16)
                     for s in SHAPES)
    errors = {}
    for causal in (True, False):
        got = out_and_grads(functools.partial(cudnn.CUDNN.attention, causal=causal), q, k, v, dout)
        want = out_and_grads(functools.partial(reference_attention, causal=causal), q, k, v, dout)
        errors[f"whole call, GQA, causal={causal}"] = max(_rel(g, w) for g, w in zip(got, want))
    want = out_and_grads(reference_attention, q, k, v, dout)
    seg = jnp.asarray((np.arange(SHAPES[0][1]) >= SHAPES[0][1] // 3).astype(np.int32))[None].repeat(SHAPES[0][0], 0)
    dispatching = {"blockwise (kernel auto)": lambda q, k, v: blockwise_attention(q, k, v, block_size=256),
                   "ring (kernel cudnn)": lambda q, k, v: ring_attention(q, k, v, block_size=256, kernel="cudnn"),
                   # The Pallas kernel compiled by Triton: a whole call and ring chunk pairs with packed documents.
                   "blockwise (kernel pallas)": lambda q, k, v: blockwise_attention(q, k, v, block_size=256,
                                                                                    kernel="pallas"),
                   "ring (kernel pallas, 2 documents)": lambda q, k, v: ring_attention(
                       q, k, v, segment_ids=seg, block_size=256, kernel="pallas")}
    want_seg = out_and_grads(lambda q, k, v: reference_attention(q, k, v, segment_ids=seg), q, k, v, dout)
    with jax.set_mesh(make_mesh(MeshConfig(sp=1), devices=jax.devices()[:1])):
        for name, fn in dispatching.items():
            oracle = want_seg if "documents" in name else want
            errors[name] = max(_rel(g, w) for g, w in zip(out_and_grads(fn, q, k, v, dout), oracle))
    return errors


def main() -> int:
    if jax.default_backend() != "gpu":
        print(f"check_cudnn_attention: needs a CUDA GPU (JAX's backend here is {jax.default_backend()})",
              file=sys.stderr)
        return 2
    errors = checks()
    for name, err in errors.items():
        print(f"{name:<32} max rel error {err:.2e} ({'ok' if err <= BF16_RTOL else 'MISSED'}, bound {BF16_RTOL:g})")
    print(json.dumps({"bound": BF16_RTOL, "errors": errors, "ok": all(e <= BF16_RTOL for e in errors.values())}))
    return 0 if all(e <= BF16_RTOL for e in errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
