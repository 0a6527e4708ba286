"""GPU checks of the cuDNN kernel (skipped without a GPU; run with JAX_PLATFORMS=cuda): its chunk
forward and float32 log-sum-exp against the pure-JAX kernel, chunk results merged through that
log-sum-exp, its chunk backward fed the global statistics of a merged attention, its whole-call
path (public `jax.nn.dot_product_attention`, cuDNN) with GQA, and blockwise / ring attention with
it against the dense reference (bfloat16)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a GPU: cuDNN runs only on CUDA devices (JAX_PLATFORMS=cuda)")

BF16_RTOL = 2e-2  # max abs error / max abs reference value, bfloat16 inputs
LSE_ATOL = 2e-2  # log-sum-exp, absolute: a merge weight is off by at most ~2%


def _rel(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _chunk(bk=4, group=4, length=1024, head_dim=128, seed=0):
    from lwm_jax.attention import kernels

    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((bk, length * group, head_dim), np.float32), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((bk, length, head_dim), np.float32), jnp.bfloat16) for _ in range(2))
    pos = jnp.arange(length, dtype=jnp.int32)[None]
    meta = kernels.Meta(kernels.ids_to_rows(pos, bk, group), None, kernels.ids_to_kv(pos, bk), None)
    return q, k, v, meta, kernels.Tiling(group, 512, 1 / np.sqrt(head_dim))


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_chunk_forward_matches_xla(causal):
    from lwm_jax.attention.kernels import cudnn, xla

    q, k, v, meta, tiling = _chunk()
    out, lse = jax.jit(lambda *a: cudnn.CUDNN.forward(*a, meta, tiling, causal=causal))(q, k, v)
    want_out, want_lse = jax.jit(lambda *a: xla.chunk_forward(*a, meta, tiling, causal=causal))(q, k, v)
    assert lse.dtype == jnp.float32
    assert _rel(out, want_out) <= BF16_RTOL
    assert float(jnp.abs(lse - want_lse).max()) <= LSE_ATOL


def test_cudnn_chunk_results_merge_through_lse():
    from lwm_jax.attention import ring
    from lwm_jax.attention.kernels import cudnn, xla

    q, k, v, meta, tiling = _chunk()
    half = k.shape[1] // 2
    out = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full(q.shape[:2], -1e30, jnp.float32)
    for lo in (0, half):
        part = meta.slice(0, q.shape[1], lo, half)
        o_p, lse_p = cudnn.CUDNN.forward(q, k[:, lo:lo + half], v[:, lo:lo + half], part, tiling, causal=False)
        out, lse = ring._merge(out, lse, o_p, lse_p, 0)
    want_out, want_lse = xla.chunk_forward(q, k, v, meta, tiling, causal=False)
    assert _rel(out, want_out) <= BF16_RTOL
    assert float(jnp.abs(lse - want_lse).max()) <= LSE_ATOL


def test_cudnn_backward_with_global_statistics_matches_xla():
    """Keys in two chunks: each chunk's backward, fed the merged output and log-sum-exp, must give
    that chunk's share of the gradients of the whole attention."""
    from lwm_jax.attention.kernels import cudnn, xla

    q, k, v, meta, tiling = _chunk()
    dout = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape, np.float32), jnp.bfloat16)
    out, lse = xla.chunk_forward(q, k, v, meta, tiling, causal=False)
    out = out.astype(q.dtype)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    want = xla.chunk_backward(q, k, v, dout, xla.backward_lse(lse), delta, meta, tiling, causal=False)
    half = k.shape[1] // 2
    dq, dks, dvs = 0.0, [], []
    for lo in (0, half):
        part = meta.slice(0, q.shape[1], lo, half)
        dq_p, dk_p, dv_p = jax.jit(lambda *a, part=part: cudnn.CUDNN.backward(*a, part, tiling, causal=False))(
            q, k[:, lo:lo + half], v[:, lo:lo + half], out, dout, lse)
        dq, dks, dvs = dq + dq_p, dks + [dk_p], dvs + [dv_p]
    for g, w in zip((dq, jnp.concatenate(dks, 1), jnp.concatenate(dvs, 1)), want):
        assert _rel(g, w) <= BF16_RTOL


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
