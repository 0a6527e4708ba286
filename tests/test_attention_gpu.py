"""GPU checks of the cuDNN kernel (run with JAX_PLATFORMS=cuda): its whole-call path (public
`jax.nn.dot_product_attention` with cuDNN's fused kernel) with GQA, and blockwise / ring attention
that dispatch to it, against the dense reference (bfloat16). Only the fused kernel needs a GPU:
the same public call's XLA implementation and the chunk pairs (which are the pure-JAX blocks) are
tested on CPU in tests/test_attention.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

needs_cudnn = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="needs a CUDA GPU: implementation='cudnn' is cuDNN's fused kernel, which XLA:CPU does not have "
           "(its CPU counterpart, implementation='xla', runs in tests/test_attention.py)")

BF16_RTOL = 2e-2  # max abs error / max abs reference value, bfloat16 inputs


def _rel(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


@needs_cudnn
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_whole_call_with_gqa_matches_reference(causal):
    """`Kernel.attention`: the public cuDNN call, 8 query heads on 2 KV heads, fwd and grads."""
    from lwm_jax.attention.kernels import cudnn
    from lwm_jax.attention.reference import reference_attention

    rng = np.random.default_rng(2)
    shapes = [(2, 1024, 8, 128), (2, 1024, 2, 128), (2, 1024, 2, 128), (2, 1024, 8, 128)]
    q, k, v, dout = (jnp.asarray(rng.standard_normal(s, np.float32), jnp.bfloat16) for s in shapes)

    def out_and_grads(fn):
        loss = lambda q, k, v: (lambda o: (jnp.sum(o.astype(jnp.float32) * dout.astype(jnp.float32)), o))(fn(q, k, v))
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return (out, *grads)

    got = out_and_grads(lambda q, k, v: cudnn.CUDNN.attention(q, k, v, causal=causal))
    want = out_and_grads(lambda q, k, v: reference_attention(q, k, v, causal=causal))
    for g, w in zip(got, want):
        assert _rel(g, w) <= BF16_RTOL


@needs_cudnn
@pytest.mark.parametrize("impl", ["blockwise-auto", "ring-cudnn"])
def test_attention_with_cudnn_matches_reference(impl):
    from lwm_jax.attention.blockwise import blockwise_attention
    from lwm_jax.attention.reference import reference_attention
    from lwm_jax.attention.ring import ring_attention
    from lwm_jax.config import MeshConfig
    from lwm_jax.parallel.mesh import make_mesh

    rng = np.random.default_rng(1)
    shapes = [(2, 1024, 8, 128), (2, 1024, 2, 128), (2, 1024, 2, 128), (2, 1024, 8, 128)]
    q, k, v, dout = (jnp.asarray(rng.standard_normal(s, np.float32), jnp.bfloat16) for s in shapes)
    attn = {"blockwise-auto": lambda q, k, v: blockwise_attention(q, k, v, block_size=256),
            "ring-cudnn": lambda q, k, v: ring_attention(q, k, v, block_size=256, kernel="cudnn")}[impl]

    def out_and_grads(fn):
        loss = lambda q, k, v: (lambda o: (jnp.sum(o.astype(jnp.float32) * dout.astype(jnp.float32)), o))(fn(q, k, v))
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return (out, *grads)

    with jax.set_mesh(make_mesh(MeshConfig(sp=1), devices=jax.devices()[:1])):
        got = out_and_grads(attn)
    want = out_and_grads(reference_attention)
    for g, w in zip(got, want):
        assert _rel(g, w) <= BF16_RTOL
