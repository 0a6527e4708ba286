"""The kernel bodies of the Pallas flash attention (`pallas`) and the two drivers that run them:
`Triton` (CUDA, ROCm) and `Mosaic` (TPU); either runs on CPU in interpret mode.

The bodies (`forward_kernel`, `dq_kernel`, `dkv_kernel`) hold the math once. A driver supplies the
loop over the other operand's blocks (inside the kernel on Triton; the last, sequential grid axis
with VMEM scratch on Mosaic), the block specs, and the layout of per-row vectors (1-D on Triton;
on Mosaic compact `[1, rows]` lane vectors in HBM, read into `[bq, 1]` columns, key-side ids
`[8, keys]` sublanes, and the forward's running statistics `[bq, 128]` in VMEM).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from lwm_jax.attention.kernels.rows import LSE_EMPTY, Tiling

_LANES, _SUBLANES = 128, 8  # the TPU vector register: query-side vectors fill lanes, key ids sublanes
# Start of the running row maximum: finite, so exp(m_old - m_new) is 1, not NaN, while a row has
# seen only masked (-inf) scores.
_M_INIT = -1e30


# Static plan of one call --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static facts of one kernel launch: block lengths, counts, scale, causality, precision."""

    bq: int
    bkv: int
    nq: int
    nkv: int
    group: int
    scale: float
    causal: bool
    precision: lax.Precision
    head_dim: int

    def last_kv(self, i):
        """The last key block that query block `i` of a diagonal pair can see."""
        return _div((i + 1) * self.bq - 1, self.group * self.bkv)

    def first_q(self, j):
        """The first query block whose rows can see key block `j` of a diagonal pair."""
        return _div(j * self.bkv * self.group, self.bq)


def _div(a, b: int):
    """`a // b` for a non-negative (possibly traced) index: `lax.div` truncates, and unlike `//`
    lowers on Mosaic without asking which TPU it is for (jnp's floor division needs `sign`)."""
    return a // b if isinstance(a, int) else lax.div(a, jnp.asarray(b, a.dtype))


def _fit(length: int, cap: int, ok) -> int:
    """The largest divisor of `length` that is at most `cap` and `ok`; `length` itself if none."""
    for size in range(min(cap, length), 0, -1):
        if length % size == 0 and ok(size):
            return size
    return length


def make_plan(driver, interpret: bool, cap_q: int, cap_kv: int, rows: int, keys: int, head_dim: int,
              tiling: Tiling, causal: bool, dtype) -> Plan:
    """The plan of a launch: blocks of at most `cap_q` rows and `cap_kv` keys that divide the chunk
    and that the driver's compiler accepts (any divisor when interpreted)."""
    ok_q, ok_kv = (lambda _: True,) * 2 if interpret else (driver.ok_q, driver.ok_kv)
    bq, bkv = _fit(rows, cap_q, ok_q), _fit(keys, cap_kv, ok_kv)
    precision = lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT
    return Plan(bq, bkv, rows // bq, keys // bkv, tiling.group, tiling.scale, causal, precision, head_dim)


def pow2(n: int) -> bool:
    """Whether `n` is a power of two."""
    return n & (n - 1) == 0


def block_index(start: int, size: int) -> int:
    """The index of the block of `size` that starts at element `start` (a pair read in place)."""
    if start % size:
        raise ValueError(f"a pair starting at row or key {start} is not on a block of {size}")
    return start // size


# Drivers: what differs between Triton and Mosaic -------------------------------------------------


class _Triton:
    """One program per block of the fixed operand; the other operand's refs are whole-length and
    the kernel loops over their blocks. Per-row vectors are 1-D."""

    name = "triton"
    ok_q = ok_kv = staticmethod(lambda n: pow2(n) and n >= 16)  # tl.dot: power-of-two tiles, >= 16

    def grid(self, bk, n_fixed, n_other):
        return (bk, n_fixed)

    def scratch(self, shapes):
        return ()

    def params(self, head_dim):
        return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)

    # Operand layouts: arrays as given, [bk, L, d] blocks and [bk, L] vectors.
    def stat_array(self, x):
        return x

    def row_array(self, x):
        return x

    def stat_shape(self, n):
        return (n,)

    vector_shape = stat_shape

    def unstat(self, x):
        return x

    def fixed_block(self, size, d, start=0):
        return pl.BlockSpec((None, size, d), lambda b, f: (b, f + block_index(start, size), 0))

    def fixed_stat(self, size, start=0):
        return pl.BlockSpec((None, size), lambda b, f: (b, f + block_index(start, size)))

    fixed_row = fixed_stat

    def other_block(self, size, length, d, clamp, start=0):
        return pl.BlockSpec((None, length, d), lambda b, f: (b, block_index(start, length), 0))

    def other_stat(self, size, length, clamp, start=0):
        return pl.BlockSpec((None, length), lambda b, f: (b, block_index(start, length)))

    other_row = other_stat

    # Loads inside the kernel.
    def load_block(self, ref, t, size):
        return ref[pl.ds(t * size, size), :]

    def load_stat(self, ref, t, size):
        return ref[pl.ds(t * size, size)]

    def store_stat(self, ref, x):
        ref[...] = x

    def load_row(self, ref, t, size):
        return ref[pl.ds(t * size, size)][None, :]

    def fixed_row_value(self, ref):
        return ref[...][None, :]

    # Per-row vector math.
    def col(self, x, n):
        """A per-row vector as a `[rows, n]`-broadcastable column."""
        return x[:, None]

    def stat(self, x):
        """A row reduction (1-D) in this driver's per-row layout."""
        return x

    def loop(self, lo, hi, n, init, step, finish, scratch):
        finish(lax.fori_loop(lo, hi, step, init()))


class _Mosaic:
    """The loop over the other operand is the last grid axis; its carry lives in VMEM scratch.
    Query-side vectors (log-sum-exp, delta, query ids) are compact `[1, rows]` lane vectors in HBM,
    4 bytes per row, turned into `[bq, 1]` columns in the kernel (as splash's dQ kernel reads its
    log-sum-exp); `[rows, 128]` would cost 512 bytes per row, 3 GiB per chip in the 524K step's
    backward. Key-side ids are `[8, keys]` sublanes (32 bytes per key); the forward's running max
    and sum are `[bq, 128]` VMEM scratch."""

    name = "mosaic"
    ok_q = staticmethod(lambda n: n % _LANES == 0)  # rows are the lanes of the `[1, bq]` vector blocks
    ok_kv = staticmethod(lambda n: n % _LANES == 0)  # keys are the lanes of every score tile

    def grid(self, bk, n_fixed, n_other):
        return (bk, n_fixed, n_other)

    def scratch(self, shapes):
        return [pltpu.VMEM(shape, jnp.float32) for shape in shapes]

    def params(self, head_dim):
        return pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY))

    def stat_array(self, x):
        return x[:, None, :]

    def row_array(self, x):
        return jnp.broadcast_to(x[:, None, :], (x.shape[0], _SUBLANES, x.shape[1]))

    def stat_shape(self, n):
        return (n, _LANES)

    def vector_shape(self, n):
        return (1, n)

    def unstat(self, x):
        return x[:, 0, :]

    def fixed_block(self, size, d, start=0):
        return pl.BlockSpec((None, size, d), lambda b, f, t: (b, f + block_index(start, size), 0))

    def fixed_stat(self, size, start=0):
        return pl.BlockSpec((None, 1, size), lambda b, f, t: (b, 0, f + block_index(start, size)))

    def fixed_row(self, size, start=0):
        return pl.BlockSpec((None, _SUBLANES, size), lambda b, f, t: (b, 0, f + block_index(start, size)))

    def other_block(self, size, length, d, clamp, start=0):
        return pl.BlockSpec((None, size, d), lambda b, f, t: (b, block_index(start, size) + clamp(f, t), 0))

    def other_stat(self, size, length, clamp, start=0):
        return pl.BlockSpec((None, 1, size), lambda b, f, t: (b, 0, block_index(start, size) + clamp(f, t)))

    def other_row(self, size, length, clamp, start=0):
        return pl.BlockSpec((None, _SUBLANES, size), lambda b, f, t: (b, 0, block_index(start, size) + clamp(f, t)))

    def load_block(self, ref, t, size):
        return ref[...]

    def load_stat(self, ref, t, size):
        return ref[0][:, None]

    def store_stat(self, ref, x):
        ref[0] = x[:, 0]

    def load_row(self, ref, t, size):
        return ref[:1, :]

    def fixed_row_value(self, ref):
        return ref[:1, :]

    def col(self, x, n):
        """A `[rows, 1]` column or `[rows, 128]` per-row vector widened (or cut) to `[rows, n]`."""
        if x.shape[1] == 1:
            return jnp.broadcast_to(x, (x.shape[0], n))
        reps = pl.cdiv(n, _LANES)
        x = jnp.tile(x, (1, reps)) if reps > 1 else x
        return x if x.shape[1] == n else x[:, :n]

    def stat(self, x):
        return lax.broadcast_in_dim(x, (x.shape[0], _LANES), (0,))

    def loop(self, lo, hi, n, init, step, finish, scratch):
        t = pl.program_id(2)
        read = lambda: tuple(ref[...] for ref in scratch)

        def write(values):
            for ref, value in zip(scratch, values):
                ref[...] = value

        pl.when(t == 0)(lambda: write(init()))
        pl.when(jnp.logical_and(t >= lo, t < hi))(lambda: write(step(t, read())))
        pl.when(t == n - 1)(lambda: finish(read()))


DRIVERS = {"triton": _Triton(), "mosaic": _Mosaic()}


# Block math shared by every kernel ---------------------------------------------------------------


def _dot(a, b, plan: Plan):
    """`a @ b` (contracting a's last and b's first dim) accumulated in float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=plan.precision,
                           preferred_element_type=jnp.float32)


def _dot_t(a, b, plan: Plan):
    """`a @ b.T` (contracting both last dims) accumulated in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=plan.precision,
                           preferred_element_type=jnp.float32)


def _scores(driver, plan: Plan, q, k, q_pos, q_seg, k_pos, k_seg):
    """Scaled scores `[bq, bkv]`, masked keys at -inf (by positions when causal, and segments)."""
    s = _dot_t(q, k, plan) * plan.scale
    n = s.shape[1]
    mask = None
    if plan.causal:
        mask = driver.col(q_pos, n) >= k_pos
    if q_seg is not None:
        same = driver.col(q_seg, n) == k_seg
        mask = same if mask is None else jnp.logical_and(mask, same)
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _probs(driver, plan: Plan, s, v, do, lse, delta):
    """`(p, ds)` of one block from the global lse and `delta = sum(dout * out)`."""
    n = s.shape[1]
    p = jnp.exp(s - driver.col(lse, n))
    ds = p * (_dot_t(do, v, plan) - driver.col(delta, n))
    return p, ds


# Kernels ----------------------------------------------------------------------------------------


def forward_kernel(driver, plan: Plan, q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref,
                    o_ref, lse_ref, *scratch):
    i = pl.program_id(1)
    q = q_ref[...]
    q_pos = None if q_pos_ref is None else driver.load_stat(q_pos_ref, 0, plan.bq)
    q_seg = None if q_seg_ref is None else driver.load_stat(q_seg_ref, 0, plan.bq)
    stat = driver.stat_shape(plan.bq)

    def init():
        return (jnp.full(stat, _M_INIT, jnp.float32), jnp.zeros(stat, jnp.float32),
                jnp.zeros((plan.bq, plan.head_dim), jnp.float32))

    def step(j, carry):
        m, l, acc = carry
        k, v = driver.load_block(k_ref, j, plan.bkv), driver.load_block(v_ref, j, plan.bkv)
        k_pos = None if k_pos_ref is None else driver.load_row(k_pos_ref, j, plan.bkv)
        k_seg = None if k_seg_ref is None else driver.load_row(k_seg_ref, j, plan.bkv)
        s = _scores(driver, plan, q, k, q_pos, q_seg, k_pos, k_seg)
        m_new = jnp.maximum(m, driver.stat(s.max(axis=1)))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - driver.col(m_new, plan.bkv))
        l = alpha * l + driver.stat(p.sum(axis=1))
        acc = acc * driver.col(alpha, plan.head_dim) + _dot(p.astype(v.dtype), v, plan)
        return m_new, l, acc

    def finish(carry):
        m, l, acc = carry
        seen = l > 0
        safe = jnp.where(seen, l, 1.0)
        o_ref[...] = acc / driver.col(safe, plan.head_dim)
        driver.store_stat(lse_ref, jnp.where(seen, m + jnp.log(safe), LSE_EMPTY))

    hi = plan.last_kv(i) + 1 if plan.causal else plan.nkv
    driver.loop(0, hi, plan.nkv, init, step, finish, scratch)


def dq_kernel(driver, plan: Plan, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, q_pos_ref, q_seg_ref,
               k_pos_ref, k_seg_ref, dq_in_ref, dq_ref, *scratch):
    i = pl.program_id(1)
    q, do = q_ref[...], do_ref[...]
    lse, delta = driver.load_stat(lse_ref, 0, plan.bq), driver.load_stat(delta_ref, 0, plan.bq)
    q_pos = None if q_pos_ref is None else driver.load_stat(q_pos_ref, 0, plan.bq)
    q_seg = None if q_seg_ref is None else driver.load_stat(q_seg_ref, 0, plan.bq)

    def step(j, carry):
        (dq,) = carry
        k, v = driver.load_block(k_ref, j, plan.bkv), driver.load_block(v_ref, j, plan.bkv)
        k_pos = None if k_pos_ref is None else driver.load_row(k_pos_ref, j, plan.bkv)
        k_seg = None if k_seg_ref is None else driver.load_row(k_seg_ref, j, plan.bkv)
        s = _scores(driver, plan, q, k, q_pos, q_seg, k_pos, k_seg)
        _, ds = _probs(driver, plan, s, v, do, lse, delta)
        return (dq + _dot(ds.astype(k.dtype), k, plan),)

    def finish(carry):  # added into the accumulator's block in place when given one (aliased)
        dq = carry[0] * plan.scale
        dq_ref[...] = dq if dq_in_ref is None else dq_in_ref[...] + dq

    hi = plan.last_kv(i) + 1 if plan.causal else plan.nkv
    init = lambda: (jnp.zeros((plan.bq, plan.head_dim), jnp.float32),)
    driver.loop(0, hi, plan.nkv, init, step, finish, scratch)


def dkv_kernel(driver, plan: Plan, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, q_pos_ref, q_seg_ref,
                k_pos_ref, k_seg_ref, dk_ref, dv_ref, *scratch):
    j = pl.program_id(1)
    k, v = k_ref[...], v_ref[...]
    k_pos = None if k_pos_ref is None else driver.fixed_row_value(k_pos_ref)
    k_seg = None if k_seg_ref is None else driver.fixed_row_value(k_seg_ref)

    def step(i, carry):
        dk, dv = carry
        q, do = driver.load_block(q_ref, i, plan.bq), driver.load_block(do_ref, i, plan.bq)
        lse, delta = driver.load_stat(lse_ref, i, plan.bq), driver.load_stat(delta_ref, i, plan.bq)
        q_pos = None if q_pos_ref is None else driver.load_stat(q_pos_ref, i, plan.bq)
        q_seg = None if q_seg_ref is None else driver.load_stat(q_seg_ref, i, plan.bq)
        s = _scores(driver, plan, q, k, q_pos, q_seg, k_pos, k_seg)
        p, ds = _probs(driver, plan, s, v, do, lse, delta)
        # Transposed in float32, then cast: the [bkv, bq] operands of dV and dK.
        dv = dv + _dot(p.T.astype(do.dtype), do, plan)
        dk = dk + _dot(ds.T.astype(q.dtype), q, plan)
        return dk, dv

    def finish(carry):
        dk, dv = carry
        dk_ref[...] = dk * plan.scale
        dv_ref[...] = dv

    lo = plan.first_q(j) if plan.causal else 0
    init = lambda: (jnp.zeros((plan.bkv, plan.head_dim), jnp.float32),) * 2
    driver.loop(lo, plan.nq, plan.nq, init, step, finish, scratch)
