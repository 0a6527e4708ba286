"""The Pallas flash-attention kernel (`kernels.pallas`) on CPU in interpret mode: one chunk pair
against the pure-JAX blocks (`xla`) and the dense reference's gradients (both drivers, diagonal
and off-diagonal pairs, GQA, packed documents, fully masked rows, float32 and bfloat16), through
blockwise and ring attention on sp, ulysses x sp and dp x sp meshes, and its lowering for CUDA
(Triton) and TPU (Mosaic) from this CPU host."""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm_jax.attention import kernels as K
from lwm_jax.attention.blockwise import blockwise_attention
from lwm_jax.attention.kernels import xla
from lwm_jax.attention.kernels.pallas import PALLAS, Blocks, PallasKernel
from lwm_jax.attention.layout import from_zigzag, place
from lwm_jax.attention.reference import reference_attention
from lwm_jax.attention.ring import ring_attention
from lwm_jax.cli import main
from lwm_jax.config import MeshConfig, ModelConfig, OptimizerConfig
from lwm_jax.parallel.mesh import make_mesh
from lwm_jax.train.optimizer import make_optimizer
from lwm_jax.train.step import build_step, init_params
from tests.conftest import make_hf_llama
from tests.test_any_length import NLL_ATOL, _hf_nll
from tests.test_attention import packed_documents

# Float32, unit-scale inputs: the kernel and its oracles differ only in the order of float32 sums
# (measured <= 3e-6 on these shapes); the project's bound for single ops.
F32_ATOL = 1e-5
# bfloat16 round-to-nearest keeps 8 significant bits: relative error <= 2^-8. With bf16 inputs the
# kernel's only roundings are of p before `p @ V` and `p^T @ dO` and of dS before `dS @ K` and
# `dS^T @ Q` (bf16 x bf16 products are exact in float32, sums are float32), so against the float32
# oracle on the same bf16 inputs: |d out| <= U * max(P |V|), |d dV| <= U * max(P^T |dO|),
# |d dQ| <= U * scale * max(|dS| |K|), |d dK| <= U * scale * max(|dS|^T |Q|), plus F32_ATOL.
BF16_U = 2.0 ** -8


# Helpers ---------------------------------------------------------------------------------------


def _inputs(batch, seq, q_heads, kv_heads, head_dim, dtype=jnp.float32, seed=0):
    """Unit-scale q, k, v and an output cotangent `[batch, seq, heads, head_dim]` in `dtype`."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, seq, q_heads, head_dim), (batch, seq, kv_heads, head_dim),
              (batch, seq, kv_heads, head_dim), (batch, seq, q_heads, head_dim)]
    return [jnp.asarray(rng.standard_normal(s, np.float32)).astype(dtype) for s in shapes]


def _rows(q, k, v, dout, seg, pos):
    """The chunk pair of a whole sequence in the rows layout: `(q, k, v, dout, meta, group)`."""
    kv_heads, group = k.shape[2], q.shape[2] // k.shape[2]
    meta = K.Meta(K.ids_to_rows(pos, kv_heads, group), K.ids_to_rows(seg, kv_heads, group),
                  K.ids_to_kv(pos, kv_heads), K.ids_to_kv(seg, kv_heads))
    return K.q_to_rows(q, kv_heads), K.kv_to_rows(k), K.kv_to_rows(v), K.q_to_rows(dout, kv_heads), meta, group


@functools.partial(jax.jit, static_argnames=("kernel", "tiling", "causal"))
def _forward(q, k, v, meta, *, kernel, tiling, causal):
    return kernel.forward(q, k, v, meta, tiling, causal=causal)


@functools.partial(jax.jit, static_argnames=("kernel", "tiling", "causal"))
def _backward(q, k, v, out, dout, lse, meta, *, kernel, tiling, causal):
    return kernel.backward(q, k, v, out, dout, lse, meta, tiling, causal=causal)


@functools.partial(jax.jit, static_argnames=("causal",))
def _reference(q, k, v, dout, seg, pos, *, causal):
    """`(out, (dq, dk, dv))` of the dense reference in float32."""
    def loss(q, k, v):
        out = reference_attention(q, k, v, segment_ids=seg, positions=pos, causal=causal)
        return jnp.sum(out * dout), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@functools.partial(jax.jit, static_argnames=("tiling", "causal"))
def _xla_pair(q, k, v, dout, meta, *, tiling, causal):
    """`(out, lse, (dq, dk, dv))` of the pure-JAX blocks, the backward fed their own out and lse."""
    out, lse = xla.chunk_forward(q, k, v, meta, tiling, causal=causal)
    delta = jnp.sum(dout.astype(jnp.float32) * out, axis=-1)
    return out, lse, xla.chunk_backward(q, k, v, dout, xla.backward_lse(lse), delta, meta, tiling, causal=causal)


def _out_and_grads(attn, q, k, v, dout):
    def loss(q, k, v):
        out = attn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())


def _assert_within(name, got, want, bound):
    err = _err(got, want)
    assert np.isfinite(np.asarray(got)).all(), f"{name}: not finite"
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def _dense_pair(q, k, v, dout, meta, scale, causal):
    """An independent float64 chunk pair (numpy): out, lse, P, dS of rows layout inputs."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    s = np.einsum("brd,btd->brt", q, k) * scale
    mask = np.ones(s.shape, bool)
    if causal:
        mask &= np.asarray(meta.q_pos)[:, :, None] >= np.asarray(meta.k_pos)[:, None, :]
    if meta.q_seg is not None:
        mask &= np.asarray(meta.q_seg)[:, :, None] == np.asarray(meta.k_seg)[:, None, :]
    top = np.where(mask, s, -np.inf).max(-1, keepdims=True)
    w = np.where(mask, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = w.sum(-1, keepdims=True)
    p = w / np.where(total > 0, total, 1.0)
    out = p @ v
    lse = np.where(total[..., 0] > 0, top[..., 0] + np.log(np.where(total > 0, total, 1.0))[..., 0], K.LSE_EMPTY)
    ds = p * (np.einsum("brd,btd->brt", dout, v) - np.sum(dout * out, -1, keepdims=True))
    return out, lse, p, ds


# The kernel alone: one chunk pair ----------------------------------------------------------------

# id: diagonal pair, q_heads, kv_heads, head_dim, driver the interpreter runs, its blocks
# (rows, keys; backward rows, keys): chosen so that query blocks straddle key blocks.
PAIRS = {
    "diagonal-gqa2-d64-triton": (True, 4, 2, 64, "triton", Blocks(32, 12, 12, 16)),
    "diagonal-gqa4-d128-mosaic": (True, 4, 1, 128, "mosaic", Blocks(32, 12, 48, 8)),
    "offdiagonal-gqa4-d128-triton": (False, 4, 1, 128, "triton", Blocks(64, 16, 24, 12)),
    "offdiagonal-gqa2-d64-mosaic": (False, 4, 2, 64, "mosaic", Blocks(24, 16, 32, 8)),
}
BATCH, SEQ = 2, 48  # two rows of packed documents (2-3 each), 48 positions


def _pair_case(case, dtype=jnp.float32):
    causal, q_heads, kv_heads, head_dim, driver, blocks = PAIRS[case]
    kernel = PallasKernel(interpreted=blocks, interpret_as=driver)
    q, k, v, dout = _inputs(BATCH, SEQ, q_heads, kv_heads, head_dim, dtype)
    seg, pos = packed_documents(BATCH, SEQ, seed=3)
    tiling = K.Tiling(q_heads // kv_heads, 8, 1.0 / np.sqrt(head_dim))
    return kernel, tiling, causal, (q, k, v, dout), seg, pos


@pytest.mark.parametrize("case", list(PAIRS))
def test_pair_matches_xla_blocks_and_reference_gradients(case):
    """Forward (out, lse) and backward (dq, dk, dv, fed the kernel's own out and lse) against the
    pure-JAX blocks and against jax.grad of the dense reference: a single pair is whole attention
    (diagonal: causal by positions; off-diagonal: every key of the same document)."""
    kernel, tiling, causal, (q, k, v, dout), seg, pos = _pair_case(case)
    qr, kr, vr, dr, meta, _ = _rows(q, k, v, dout, seg, pos)
    static = dict(tiling=tiling, causal=causal)
    out, lse = _forward(qr, kr, vr, meta, kernel=kernel, **static)
    grads = _backward(qr, kr, vr, out, dr, lse, meta, kernel=kernel, **static)

    want_out, want_lse, want_grads = _xla_pair(qr, kr, vr, dr, meta, **static)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (want_out, want_lse, *want_grads)):
        _assert_within(f"{name} vs xla", g, w, F32_ATOL)

    ref_out, ref_grads = _reference(q, k, v, dout, seg, pos, causal=causal)
    batch, q_heads = q.shape[0], q.shape[2]
    got = (K.rows_to_q(out, batch, q_heads), K.rows_to_q(grads[0], batch, q_heads),
           K.rows_to_kv(grads[1], batch), K.rows_to_kv(grads[2], batch))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, (ref_out, *ref_grads)):
        _assert_within(f"{name} vs reference", g, w, F32_ATOL)


@functools.partial(jax.jit, static_argnames=("kernel", "tiling", "causal", "starts", "sizes"))
def _backward_into(q, k, v, dout, lse, delta, meta, dq_acc, *, kernel, tiling, causal, starts, sizes):
    return kernel.backward_into(q, k, v, dout, lse, delta, meta, tiling, dq_acc, causal=causal, q_start=starts[0],
                                k_start=starts[1], n_rows=sizes[0], n_keys=sizes[1])


@pytest.mark.parametrize("case", list(PAIRS))
def test_backward_into_reads_the_pair_in_place_and_adds_into_the_accumulator(case):
    """The ring's backward of the second half of the rows against the second (diagonal) or first
    half of the keys, read at block offsets in the whole arrays, its dQ added into a random
    accumulator in place: equal to the pure-JAX blocks' `backward_into` (dynamic slices), the
    accumulator's other rows untouched."""
    kernel, tiling, causal, _, _, _ = _pair_case(case)
    _, q_heads, kv_heads, head_dim, _, _ = PAIRS[case]
    q, k, v, dout = _inputs(BATCH, 2 * SEQ, q_heads, kv_heads, head_dim, seed=5)
    seg, pos = packed_documents(BATCH, 2 * SEQ, seed=4)
    qr, kr, vr, dr, meta, group = _rows(q, k, v, dout, seg, pos)
    n_rows, n_keys = SEQ * group, SEQ
    starts, sizes = (n_rows, n_keys if causal else 0), (n_rows, n_keys)
    pair = meta.slice(starts[0], n_rows, starts[1], n_keys)
    out, lse_pair = xla.chunk_forward(qr[:, n_rows:], kr[:, starts[1]:starts[1] + n_keys],
                                      vr[:, starts[1]:starts[1] + n_keys], pair, tiling, causal=causal)
    rng = np.random.default_rng(6)
    lse = jnp.concatenate([jnp.asarray(rng.standard_normal(lse_pair.shape), jnp.float32),
                           xla.backward_lse(lse_pair)], axis=1)
    delta = jnp.concatenate([jnp.zeros_like(lse_pair), jnp.sum(dr[:, n_rows:] * out, axis=-1)], axis=1)
    acc = jnp.asarray(rng.standard_normal(qr.shape), jnp.float32)
    static = dict(tiling=tiling, causal=causal, starts=starts, sizes=sizes)
    got = _backward_into(qr, kr, vr, dr, lse, delta, meta, acc, kernel=kernel, **static)
    want = _backward_into(qr, kr, vr, dr, lse, delta, meta, acc, kernel=K.XLA, **static)
    assert np.array_equal(np.asarray(got[0][:, :n_rows]), np.asarray(acc[:, :n_rows]))
    for name, g, w in zip(("dq_acc", "dk", "dv"), got, want):
        _assert_within(f"{name} vs xla", g, w, F32_ATOL)


@pytest.mark.parametrize("case", ["offdiagonal-gqa4-d128-triton", "offdiagonal-gqa2-d64-mosaic"])
def test_fully_masked_rows_get_lse_empty_zero_output_and_no_gradient(case):
    """An off-diagonal pair where documents of some query rows have no key here (row 0), and a
    whole shard with no visible key (row 1): LSE_EMPTY, zero output, zero gradients, no NaN."""
    kernel, tiling, causal, (q, k, v, dout), _, pos = _pair_case(case)
    q_seg = np.repeat(np.array([[0, 1, 2], [5, 5, 5]], np.int32), SEQ // 3, axis=1)
    k_seg = np.repeat(np.array([[0, 0, 1], [7, 7, 7]], np.int32), SEQ // 3, axis=1)  # no keys of doc 2
    qr, kr, vr, dr, meta, group = _rows(q, k, v, dout, jnp.asarray(q_seg), pos)
    meta = meta._replace(k_seg=K.ids_to_kv(jnp.asarray(k_seg), k.shape[2]))
    static = dict(tiling=tiling, causal=causal)
    out, lse = _forward(qr, kr, vr, meta, kernel=kernel, **static)
    dq, dk, dv = _backward(qr, kr, vr, out, dr, lse, meta, kernel=kernel, **static)

    empty = ~(np.asarray(meta.q_seg)[:, :, None] == np.asarray(meta.k_seg)[:, None, :]).any(-1)
    kv_heads = k.shape[2]  # bk entries per batch row: doc 2 of row 0 and all of row 1 see no key
    np.testing.assert_array_equal(empty.sum(1), [SEQ // 3 * group] * kv_heads + [SEQ * group] * kv_heads)
    assert (np.asarray(lse)[empty] == K.LSE_EMPTY).all() and (np.asarray(lse)[~empty] > K.LSE_EMPTY / 2).all()
    assert (np.asarray(out)[empty] == 0).all() and (np.asarray(dq)[empty] == 0).all()
    shard1 = slice(k.shape[2], None)  # bk entries of batch row 1
    assert (np.asarray(dk)[shard1] == 0).all() and (np.asarray(dv)[shard1] == 0).all()

    want_out, want_lse, want = _xla_pair(qr, kr, vr, dr, meta, **static)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), (want_out, want_lse, *want)):
        _assert_within(f"{name} vs xla", g, w, F32_ATOL)


@pytest.mark.parametrize("case", ["diagonal-gqa2-d64-triton", "offdiagonal-gqa4-d128-triton"])
def test_pair_in_bfloat16_within_the_derived_rounding_bound(case):
    """bf16 inputs: the kernel against float32 math on the same (bf16-rounded) inputs, within the
    bound derived from its four bf16 roundings (BF16_U); the backward is fed the float64 oracle's
    out and lse, so only the kernel's own roundings are measured."""
    kernel, tiling, causal, inputs, seg, pos = _pair_case(case, jnp.bfloat16)
    q, k, v, dout = inputs
    qr, kr, vr, dr, meta, _ = _rows(q, k, v, dout, seg, pos)
    out64, lse64, p, ds = _dense_pair(qr, kr, vr, dr, meta, tiling.scale, causal)
    static = dict(tiling=tiling, causal=causal)
    out, lse = _forward(qr, kr, vr, meta, kernel=kernel, **static)
    dq, dk, dv = _backward(qr, kr, vr, jnp.asarray(out64, jnp.float32), dr, jnp.asarray(lse64, jnp.float32), meta,
                           kernel=kernel, **static)
    f32 = lambda x: x.astype(jnp.float32)
    ref_out, ref_grads = _reference(f32(q), f32(k), f32(v), f32(dout), seg, pos, causal=causal)

    absolute = lambda x: np.abs(np.asarray(x, np.float64))
    bound_out = BF16_U * (p @ absolute(vr)).max() + F32_ATOL
    bound_dv = BF16_U * (p.transpose(0, 2, 1) @ absolute(dr)).max() + F32_ATOL
    bound_dq = BF16_U * tiling.scale * (np.abs(ds) @ absolute(kr)).max() + F32_ATOL
    bound_dk = BF16_U * tiling.scale * (np.abs(ds).transpose(0, 2, 1) @ absolute(qr)).max() + F32_ATOL
    batch, q_heads = q.shape[0], q.shape[2]
    _assert_within("out", K.rows_to_q(out, batch, q_heads), ref_out, bound_out)
    _assert_within("lse", lse, lse64, F32_ATOL)
    _assert_within("dq", K.rows_to_q(dq, batch, q_heads), ref_grads[0], bound_dq)
    _assert_within("dk", K.rows_to_kv(dk, batch), ref_grads[1], bound_dk)
    _assert_within("dv", K.rows_to_kv(dv, batch), ref_grads[2], bound_dv)


def test_registered_and_supported_calls():
    assert K.get_kernel("pallas") is PALLAS and PALLAS.platforms == ()
    assert ModelConfig(attention_kernel="pallas").attention_kernel == "pallas"
    for platform in ("cpu", "gpu", "tpu"):
        assert K.select_kernel("pallas", dtype=jnp.bfloat16, head_dim=128, segments=True, platform=platform) is PALLAS
    assert PALLAS.supports(dtype=jnp.float16, head_dim=64, segments=True) is None
    assert "head_dim=96" in PALLAS.supports(dtype=jnp.bfloat16, head_dim=96, segments=False)
    assert "float64" in PALLAS.supports(dtype=jnp.float64, head_dim=64, segments=False)
    with pytest.raises(ValueError, match="interpret_as='cuda'"):
        PallasKernel(interpret_as="cuda")


# Model-level paths: blockwise and ring ----------------------------------------------------------

# id: mesh axes, batch; every case: 64 tokens of packed documents, 8 query heads on 2 KV heads.
RING_MESHES = {"sp4": (dict(sp=4), 1), "ulysses2-sp2": (dict(ulysses=2, sp=2), 1), "dp2-sp4": (dict(dp=2, sp=4), 2)}


def _mesh(**axes):
    config = MeshConfig(**axes)
    return make_mesh(config, devices=jax.devices()[:int(np.prod(config.shape))])


def test_blockwise_with_the_pallas_kernel_matches_reference():
    q, k, v, dout = _inputs(2, 40, 8, 2, 16)
    seg, pos = packed_documents(2, 40)
    got = _out_and_grads(lambda q, k, v: blockwise_attention(
        q, k, v, segment_ids=seg, positions=pos, block_size=8, kernel="pallas"), q, k, v, dout)
    want = _reference(q, k, v, dout, seg, pos, causal=True)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (want[0], *want[1])):
        _assert_within(name, g, w, F32_ATOL)


@pytest.mark.parametrize("case", list(RING_MESHES))
def test_ring_with_the_pallas_kernel_matches_reference(case):
    axes, batch = RING_MESHES[case]
    mesh, sp = _mesh(**axes), axes["sp"]
    q, k, v, dout = _inputs(batch, 64, 8, 2, 16)
    seg, pos = packed_documents(batch, 64)
    want = _reference(q, k, v, dout, seg, pos, causal=True)
    with jax.set_mesh(mesh):
        zq, zk, zv, zd, zseg, zpos = place([np.asarray(x) for x in (q, k, v, dout, seg, pos)], "ring", mesh)
        got = _out_and_grads(lambda q, k, v: ring_attention(
            q, k, v, segment_ids=zseg, positions=zpos, block_size=4, kernel="pallas"), zq, zk, zv, zd)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (want[0], *want[1])):
        _assert_within(name, from_zigzag(np.asarray(g), sp), w, F32_ATOL)


# Lowering for CUDA and TPU from this CPU host ----------------------------------------------------

# What the lowered ring holds per platform: its custom call, and how many kernel launches. Each
# chunk pair is its own call: step 0's diagonal pair and a later step's two pairs (the step loop's
# body appears once), forward; backward, a dQ and a dK/dV kernel per pair, the later step's second
# pair once per branch of its traced slot (the backward reads pairs at static offsets).
TARGETS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
LAUNCHES = {"lwm_flash_forward": 3, "lwm_flash_dq": 4, "lwm_flash_dkv": 4}
RING_LOOPS = 2  # the ring's forward and backward step loops; an interpreted kernel adds a grid loop


@pytest.mark.parametrize("platform", list(TARGETS))
def test_ring_forward_and_backward_lower_to_the_compiled_kernel(platform):
    """`value_and_grad` of ring attention (sp=4, bf16, 8/2 heads of 128, packed documents) lowered
    for `platform` on the CPU mesh: the platform switch keeps only that platform's Pallas kernels,
    as custom calls, and no interpreted loop."""
    mesh = _mesh(sp=4)
    seq = 2 * 4 * 128  # 128 positions per zigzag chunk: Triton's and Mosaic's tile rules hold
    q = jax.ShapeDtypeStruct((1, seq, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, seq, 2, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def loss(q, k, v, seg, pos):
        out = ring_attention(q, k, v, segment_ids=seg, positions=pos, kernel="pallas")
        return jnp.sum(out.astype(jnp.float32))

    with jax.set_mesh(mesh):
        text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, ids, ids).lower(
            lowering_platforms=(platform,)).as_text()
    calls = re.findall(r"stablehlo\.custom_call @([\w$.]+)\(", text)
    assert calls.count(TARGETS[platform]) == sum(LAUNCHES.values()), sorted(set(calls))
    for name, count in LAUNCHES.items():  # each launch names its kernel once in its config
        assert len(re.findall(rf'name = "{name}"', text)) == count, name
    assert text.count("stablehlo.while") == RING_LOOPS


# The model with the Pallas kernel ------------------------------------------------------------------

# Two train steps of a float32 model, Pallas against the pure-JAX blocks: the same attention in a
# different order of float32 sums (<= F32_ATOL per op), through a layer and one AdamW update
# whose eps keeps it Lipschitz in the gradient; the losses are O(5) means.
STEP_LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    """A random transformers Llama (GQA 4/1, head_dim 16), its checkpoint and a 1,025-token file."""
    root = tmp_path_factory.mktemp("pallas_model")
    hf = make_hf_llama(root / "hf", seed=3)
    assert main(["import-hf", str(root / "hf"), str(root / "ckpt")]) == 0
    tokens = np.random.default_rng(3).integers(0, 256, 1025).astype(np.int32)
    np.save(root / "tokens.npy", tokens)
    return hf, root, tokens


def test_eval_ppl_with_the_pallas_kernel_matches_transformers(hf_ckpt, capsys):
    """`eval ppl --attention ring --attention-kernel pallas` on dp x Ulysses x ring, at a length the
    layout pads (1,025 tokens), against transformers' mean NLL."""
    mesh = "dp=2,ulysses=2,sp=2"
    hf, root, tokens = hf_ckpt
    capsys.readouterr()
    assert main(["eval", "ppl", str(root / "ckpt"), "--tokens", str(root / "tokens.npy"), "--attention", "ring",
                 "--attention-kernel", "pallas", "--mesh", mesh, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    sums, counts = _hf_nll(hf, [tokens])
    assert result["tokens"] == counts[0] and abs(result["mean_nll"] - sums[0] / counts[0]) <= NLL_ATOL


def test_two_train_steps_with_the_pallas_kernel_equal_the_xla_kernel():
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=16, bos_token_id=1, eos_token_id=(2,), attention="ring",
                         attention_block_size=16, remat="none")
    mesh = make_mesh(MeshConfig(dp=2, sp=4))
    seg, pos = packed_documents(2, 128, seed=5)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 256, (1, 2, 129)).astype(np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "positions": np.asarray(pos)[None],
             "segment_ids": np.asarray(seg)[None], "loss_weights": np.ones((1, 2, 128), np.float32)}
    losses = {}
    for kernel in ("xla", "pallas"):
        tx = make_optimizer(OptimizerConfig(lr=1e-2, eps=1e-3), total_steps=2)
        with jax.set_mesh(mesh):
            fns = build_step(config.replace(attention_kernel=kernel), tx, mesh, document_mask=True)
            params = init_params(config, 0, mesh)
            opt_state = fns.init_opt_state(params)
            arrays = {k: jax.device_put(place({"x": v}, "ring", None, axis=2)["x"], fns.batch_sharding)
                      for k, v in batch.items()}
            for _ in range(2):
                params, opt_state, metrics = fns.train_step(params, opt_state, arrays)
                losses.setdefault(kernel, []).append(float(metrics["loss"]))
    assert np.allclose(losses["pallas"], losses["xla"], rtol=STEP_LOSS_RTOL, atol=0), losses
    assert losses["xla"][1] < losses["xla"][0]  # the steps train
