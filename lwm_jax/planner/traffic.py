"""Bytes each device moves per layer for sequence-parallel attention, per scheme and mesh axis:
the ring's KV blocks over `sp`, Ulysses' all-to-alls over `ulysses`; and which link each axis uses.

The planner turns them into seconds at the hardware's link bandwidths; `scripts/bench_attention.py`
prints them beside its measured rows. Counts follow `attention.ring` and `attention.ulysses` exactly
(only the KV heads travel; positions and segment ids, 8 bytes a token, are left out).
"""

from __future__ import annotations

from lwm_jax.config import MESH_AXES, MeshConfig
from lwm_jax.parallel.mesh import SP, ULYSSES


def attention_bytes_per_device(seq_len: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int,
                               sp: int, ulysses: int) -> dict:
    """Bytes one device sends in one layer's attention (batch 1), forward and backward apart:

    - `ring` (axis `sp`): forward, its K and V block (`seq_len/sp` tokens, its KV heads after the
      Ulysses exchange) on `sp-1` hops; backward, the block again on `sp-1` hops and the float32
      dK/dV accumulators on `sp` (the last one home).
    - `ulysses` (axis `ulysses`): forward, the all-to-alls of q, k, v in and of the output back
      (each sends `(U-1)/U` of its array); backward, their transposes (dout in, dq, dk, dv back).
      With fewer KV heads than devices each device receives one KV head (`U` slots are sent).

    `heads`, `kv_heads` are those of one tp shard. Returns `{"ring": {"axis", "forward_bytes",
    "backward_bytes"}, "ulysses": {...}, "total_bytes"}`.
    """
    kv_sent = kv_heads if kv_heads % ulysses == 0 else ulysses  # heads entering the exchange
    kv_device = kv_sent // ulysses  # KV heads each device runs the ring on
    local = seq_len // (sp * ulysses)
    share = (ulysses - 1) / ulysses
    a2a = lambda h: int(local * h * head_dim * dtype_bytes * share)
    ulysses_bytes = 2 * a2a(heads) + 2 * a2a(kv_sent)  # q and out, k and v
    block = seq_len // sp * kv_device * head_dim
    ring_fwd = (sp - 1) * 2 * block * dtype_bytes
    ring_bwd = ring_fwd + (sp * 2 * block * 4 if sp > 1 else 0)
    out = {"ring": {"axis": SP, "forward_bytes": ring_fwd, "backward_bytes": ring_bwd},
           "ulysses": {"axis": ULYSSES, "forward_bytes": ulysses_bytes, "backward_bytes": ulysses_bytes}}
    out["total_bytes"] = sum(v["forward_bytes"] + v["backward_bytes"] for v in out.values())
    return out


def axis_link(mesh: MeshConfig, axis: str, devices_per_node: int) -> str:
    """`intra-node` or `inter-node`: the link a group along `axis` uses, devices being numbered
    along the mesh axes with the last one fastest (a group spans the sizes of its axis and the
    ones after it)."""
    sizes = dict(zip(MESH_AXES, mesh.shape))
    span = 1
    for name in reversed(MESH_AXES):
        span *= sizes[name]
        if name == axis:
            break
    return "inter-node" if span > devices_per_node else "intra-node"
