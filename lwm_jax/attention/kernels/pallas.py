"""Pallas flash attention for one chunk pair: a float32 log-sum-exp forward and a backward fed the
global (merged) output and log-sum-exp, the two things a ring step needs from a fused kernel.

One program, three targets, chosen where it is lowered (`jax.lax.platform_dependent`): Triton on
CUDA/ROCm, Mosaic on TPU, and on CPU (or any other platform) the same kernels in Pallas interpret
mode, so a CPU host lowers the very program a GPU or TPU runs. The kernel bodies and the two
drivers live in `pallas_flash`; this module launches them and is the `Kernel`.

- Forward: grid `[bk, query blocks]`, an online softmax over key blocks (Mosaic: a last, sequential
  grid axis); float32 output and lse.
- Backward: `delta = sum(dout * out)` in XLA, then a dK/dV kernel gridded over key blocks (looping
  over query blocks) and a dQ kernel gridded over query blocks (looping over key blocks); both
  recompute `p = exp(scale * s - lse)` from the global lse (rows with `LSE_EMPTY` give p = 0).
  In the ring (`backward_into`) both read the chunk pair at block offsets in the whole local
  arrays, and the dQ kernel adds into the float32 accumulator's rows in place (aliased).
- Masking: inside a block by positions (diagonal pairs) and segment ids, masked scores at -inf, so
  a row that sees no key ends with `LSE_EMPTY` and a zero output. A diagonal pair visits only the
  blocks that hold a query row at or after a key (rows `s*group + g` against keys `t <= s`): the
  loop bounds skip the rest, and on Mosaic their index maps repeat the last block so nothing is
  copied for them.
- GQA: the rows layout puts a KV head's `group` query heads in one block, so K/V are never repeated.

Mosaic-GPU port (the Triton backend is deprecated from JAX 0.11): the masking and softmax math
carries over, the loops do not. A Mosaic-GPU kernel is launched with `plgpu.kernel`, not
`pallas_call`; it copies Q once and K/V blocks into shared-memory slots with TMA
(`plgpu.copy_gmem_to_smem` and barriers; `plgpu.emit_pipeline_warp_specialized` in the backward),
and runs both products as warpgroup matmuls (`plgpu.wgmma` into `plgpu.ACC` accumulators) on
query tiles of 64 rows per warpgroup, as `jax.experimental.pallas.ops.gpu.attention_mgpu` does.
So it would be a third driver with its own kernel bodies, and this platform switch would send
`cuda` to it.

Never run on a GPU or TPU yet. The tests run it interpreted on CPU and lower it for `cuda` and
`tpu` from a CPU host. Compiled ahead of time without a device (on a CPU host, not by the tests,
which lack the two compilers): for an H100 with jax-cuda13-plugin 0.10.2 (Triton to PTX) and for
TPU v5e, v5p and v6e with libtpu 0.0.42.1 (Mosaic through lower-to-llo). The block sizes are
untuned defaults.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lwm_jax.attention.kernels.base import Kernel
from lwm_jax.attention.kernels.pallas_flash import DRIVERS, Plan, dkv_kernel, dq_kernel, forward_kernel, make_plan, pow2
from lwm_jax.attention.kernels.rows import Meta, Tiling
from lwm_jax.attention.kernels.xla import backward_lse

_DTYPES = tuple(jnp.dtype(t) for t in (jnp.bfloat16, jnp.float16, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Block lengths of one target: query rows and keys per block, forward and backward. A length
    that does not divide the chunk falls back to the largest divisor the target accepts."""

    q: int
    kv: int
    q_bwd: int
    kv_bwd: int


# Triton (H100-class): 128x64 forward tiles and 64x64 backward tiles, the sizes of Triton's
# fused-attention tutorial. Mosaic: splash's default 512 forward, half that backward, where four
# [bq, bkv] float32 tiles are live at once.
TRITON_BLOCKS = Blocks(q=128, kv=64, q_bwd=64, kv_bwd=64)
MOSAIC_BLOCKS = Blocks(q=512, kv=512, q_bwd=256, kv_bwd=256)


@dataclasses.dataclass(frozen=True)
class _Target:
    """What one branch of the platform switch runs: a driver, its blocks (None: the call's
    `Tiling.block` positions), interpreted or compiled."""

    driver: str
    blocks: Blocks | None
    interpret: bool

    def plan(self, rows: int, keys: int, q, tiling: Tiling, causal: bool, backward: bool) -> Plan:
        if self.blocks is None:
            cap_q, cap_kv = tiling.block * tiling.group, tiling.block
        elif backward:
            cap_q, cap_kv = self.blocks.q_bwd, self.blocks.kv_bwd
        else:
            cap_q, cap_kv = self.blocks.q, self.blocks.kv
        return make_plan(DRIVERS[self.driver], self.interpret, cap_q, cap_kv, rows, keys, q.shape[2],
                         tiling, causal, q.dtype)


# Launchers: operands, block specs and the pallas_call of each kernel ----------------------------


def _call(target: _Target, plan: Plan, kernel, name: str, grid_blocks, inputs, outputs, carry_shapes,
          aliases=None):
    """`pallas_call` of `kernel(driver, plan, *refs)`; `inputs` and `outputs` are `(array, spec)`
    and `(ShapeDtypeStruct, spec)` pairs, None for an absent optional operand (its ref is None);
    `aliases`: `{input position in inputs: output}` written in place."""
    driver = DRIVERS[target.driver]
    present = [x for x in inputs if x is not None]
    where = [x is not None for x in inputs]
    aliases = {sum(where[:i]): o for i, o in (aliases or {}).items() if where[i]}

    def body(*refs):
        it = iter(refs[:len(present)])
        kernel(driver, plan, *[next(it) if here else None for here in where], *refs[len(present):])

    return pl.pallas_call(
        body, grid=driver.grid(*grid_blocks), in_specs=[spec for _, spec in present],
        out_specs=[spec for _, spec in outputs], out_shape=[shape for shape, _ in outputs],
        scratch_shapes=driver.scratch(carry_shapes), interpret=target.interpret,
        compiler_params=None if target.interpret else driver.params(plan.head_dim),
        input_output_aliases=aliases, name=name)(*[x for x, _ in present])


def _ids(driver, meta: Meta, causal: bool):
    """The id operands `(q_pos, q_seg, k_pos, k_seg)` in the driver's layout; None where unused
    (positions only mask diagonal pairs)."""
    use_pos, use_seg = causal, meta.q_seg is not None
    stat = lambda x, use: driver.stat_array(x.astype(jnp.int32)) if use else None
    row = lambda x, use: driver.row_array(x.astype(jnp.int32)) if use else None
    return (stat(meta.q_pos, use_pos), stat(meta.q_seg, use_seg),
            row(meta.k_pos, use_pos), row(meta.k_seg, use_seg))


def _with(array, spec):
    return None if array is None else (array, spec)


def _forward(target: _Target, q, k, v, meta: Meta, *, tiling: Tiling, causal: bool):
    driver = DRIVERS[target.driver]
    (bk, rows, d), keys = q.shape, k.shape[1]
    plan = target.plan(rows, keys, q, tiling, causal, backward=False)
    clamp = (lambda i, j: jnp.minimum(j, plan.last_kv(i))) if causal else (lambda i, j: j)
    q_pos, q_seg, k_pos, k_seg = _ids(driver, meta, causal)
    kv_spec, k_ids = driver.other_block(plan.bkv, keys, d, clamp), driver.other_row(plan.bkv, keys, clamp)
    out, lse = _call(
        target, plan, forward_kernel, "lwm_flash_forward", (bk, plan.nq, plan.nkv),
        [(q, driver.fixed_block(plan.bq, d)), (k, kv_spec), (v, kv_spec),
         _with(q_pos, driver.fixed_stat(plan.bq)), _with(q_seg, driver.fixed_stat(plan.bq)),
         _with(k_pos, k_ids), _with(k_seg, k_ids)],
        [(jax.ShapeDtypeStruct((bk, rows, d), jnp.float32), driver.fixed_block(plan.bq, d)),
         (jax.ShapeDtypeStruct((bk, *driver.vector_shape(rows)), jnp.float32), driver.fixed_stat(plan.bq))],
        [driver.stat_shape(plan.bq), driver.stat_shape(plan.bq), (plan.bq, d)])
    return out, driver.unstat(lse)


def _backward(target: _Target, q, k, v, dout, lse, delta, meta: Meta, dq_acc, *, tiling: Tiling, causal: bool,
              q_start: int = 0, k_start: int = 0, n_rows: int | None = None, n_keys: int | None = None):
    """`(dq, dk, dv)` of query rows `[q_start, +n_rows)` against keys `[k_start, +n_keys)` (default:
    all), read in place from the whole arrays. With `dq_acc` (float32, `q`'s shape) the pair's dQ is
    added into its rows in place and the whole accumulator returned; else the pair's dQ."""
    driver = DRIVERS[target.driver]
    bk, d = q.shape[0], q.shape[2]
    rows, keys = n_rows or q.shape[1], n_keys or k.shape[1]
    plan = target.plan(rows, keys, q, tiling, causal, backward=True)
    q_pos, q_seg, k_pos, k_seg = _ids(driver, meta, causal)
    lse, delta, dout = driver.stat_array(lse), driver.stat_array(delta), dout.astype(q.dtype)

    # dQ: one query block per program, looping over the key blocks it can see.
    clamp = (lambda i, j: jnp.minimum(j, plan.last_kv(i))) if causal else (lambda i, j: j)
    kv_spec = driver.other_block(plan.bkv, keys, d, clamp, k_start)
    k_ids = driver.other_row(plan.bkv, keys, clamp, k_start)
    q_spec, q_vec = driver.fixed_block(plan.bq, d, q_start), driver.fixed_stat(plan.bq, q_start)
    dq_rows = q.shape[1] if dq_acc is not None else rows
    dq_spec = q_spec if dq_acc is not None else driver.fixed_block(plan.bq, d)
    (dq,) = _call(
        target, plan, dq_kernel, "lwm_flash_dq", (bk, plan.nq, plan.nkv),
        [(q, q_spec), (dout, q_spec), (lse, q_vec), (delta, q_vec), (k, kv_spec), (v, kv_spec),
         _with(q_pos, q_vec), _with(q_seg, q_vec), _with(k_pos, k_ids), _with(k_seg, k_ids), _with(dq_acc, dq_spec)],
        [(jax.ShapeDtypeStruct((bk, dq_rows, d), jnp.float32), dq_spec)], [(plan.bq, d)], aliases={10: 0})

    # dK, dV: one key block per program, looping over the query blocks that can see it.
    clamp = (lambda j, i: jnp.maximum(i, plan.first_q(j))) if causal else (lambda j, i: i)
    q_spec = driver.other_block(plan.bq, rows, d, clamp, q_start)
    q_vec = driver.other_stat(plan.bq, rows, clamp, q_start)
    kv_spec, k_ids = driver.fixed_block(plan.bkv, d, k_start), driver.fixed_row(plan.bkv, k_start)
    out_spec = driver.fixed_block(plan.bkv, d)
    dk, dv = _call(
        target, plan, dkv_kernel, "lwm_flash_dkv", (bk, plan.nkv, plan.nq),
        [(k, kv_spec), (v, kv_spec), (q, q_spec), (dout, q_spec), (lse, q_vec), (delta, q_vec),
         _with(q_pos, q_vec), _with(q_seg, q_vec), _with(k_pos, k_ids), _with(k_seg, k_ids)],
        [(jax.ShapeDtypeStruct((bk, keys, d), jnp.float32), out_spec)] * 2, [(plan.bkv, d)] * 2)
    return dq, dk, dv


# The kernel -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=True)
class PallasKernel(Kernel):
    """Pallas flash attention on every platform: Triton (CUDA, ROCm), Mosaic (TPU), interpreted
    elsewhere. `triton`, `mosaic`: each compiled target's block lengths; `interpreted`: the
    interpreter's (None: the call's `Tiling.block`, as the pure-JAX kernel tiles); `interpret_as`:
    which driver the interpreter runs (`triton` or `mosaic`: the same math, another loop)."""

    triton: Blocks = TRITON_BLOCKS
    mosaic: Blocks = MOSAIC_BLOCKS
    interpreted: Blocks | None = None
    interpret_as: str = "triton"
    name: str = "pallas"
    platforms: tuple[str, ...] = ()
    static_offsets: bool = True

    def __post_init__(self):
        if self.interpret_as not in DRIVERS:
            raise ValueError(f"interpret_as={self.interpret_as!r} is not one of {tuple(DRIVERS)}")

    def supports(self, *, dtype, head_dim, segments):
        if jnp.dtype(dtype) not in _DTYPES:
            return f"dtype {jnp.dtype(dtype).name} (the Pallas kernel takes bfloat16, float16 or float32)"
        if not (16 <= head_dim <= 256 and pow2(head_dim)):
            return f"head_dim={head_dim} (the Pallas kernel needs a power of two from 16 to 256: Triton's tiles)"
        return None

    def _switch(self, fn, *args):
        """`fn(target, *args)` of the platform the program is lowered for."""
        interpreted = functools.partial(fn, _Target(self.interpret_as, self.interpreted, True))
        triton = functools.partial(fn, _Target("triton", self.triton, False))
        mosaic = functools.partial(fn, _Target("mosaic", self.mosaic, False))
        return lax.platform_dependent(*args, cpu=interpreted, cuda=triton, rocm=triton, tpu=mosaic,
                                      default=interpreted)

    def forward(self, q, k, v, meta: Meta, tiling: Tiling, *, causal: bool):
        _check(q.shape[1], k.shape[1], tiling, causal)
        return self._switch(functools.partial(_forward, tiling=tiling, causal=causal), q, k, v, meta)

    def backward(self, q, k, v, out, dout, lse, meta: Meta, tiling: Tiling, *, causal: bool):
        _check(q.shape[1], k.shape[1], tiling, causal)
        delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        return self._switch(functools.partial(_backward, tiling=tiling, causal=causal),
                            q, k, v, dout, backward_lse(lse), delta, meta, None)

    def backward_into(self, q, k, v, dout, lse, delta, meta: Meta, tiling: Tiling, dq_acc, *, causal: bool,
                      q_start, k_start, n_rows: int, n_keys: int):
        """The ring's backward of one chunk pair (see `Kernel.backward_into`): both kernels read the
        pair's rows and keys in place (block offsets in their index maps) and the dQ kernel adds
        into the accumulator's rows in place, so no pair-sized copy or float32 dQ exists."""
        if not (isinstance(q_start, int) and isinstance(k_start, int)):
            raise TypeError("the Pallas kernel's backward_into takes static starts (static_offsets)")
        _check(n_rows, n_keys, tiling, causal)
        return self._switch(functools.partial(_backward, tiling=tiling, causal=causal, q_start=q_start,
                                              k_start=k_start, n_rows=n_rows, n_keys=n_keys),
                            q, k, v, dout, lse, delta, meta, dq_acc)


def _check(rows: int, keys: int, tiling: Tiling, causal: bool) -> None:
    if causal and rows != keys * tiling.group:
        raise ValueError(f"a diagonal pair needs rows = keys * group; got {rows} rows, {keys} keys, "
                         f"group={tiling.group}")


PALLAS = PallasKernel()
