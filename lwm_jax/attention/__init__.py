"""One attention entry point for the model: `attention(q, k, v, ..., impl=...)`.

`reference` is the dense oracle, `blockwise` the single-device flash-style tiling, `ring` the
sequence-parallel attention over the mesh's `ulysses` (all-to-all, `ulysses.py`) and `sp` (the
zigzag ring, `ring.py`) axes, either of which may be 1. All take the same arguments and agree numerically;
`IMPLEMENTATIONS` is the registry every caller (config checks aside) takes its choices from.
`layout` says how a batch must be laid out for each; `decode` attends one new token over a
sequence-sharded KV cache.
"""

from __future__ import annotations

from lwm_jax.attention.blockwise import blockwise_attention
from lwm_jax.attention.reference import reference_attention
from lwm_jax.attention.ring import ring_attention
from lwm_jax.config import ATTENTION_IMPLS

IMPLEMENTATIONS = {"reference": reference_attention, "blockwise": blockwise_attention, "ring": ring_attention}
assert tuple(IMPLEMENTATIONS) == ATTENTION_IMPLS, "the registry and the config's names must agree"


def attention(q, k, v, *, segment_ids=None, positions=None, causal: bool = True,
              impl: str = "reference", block_size: int = 512, kernel: str = "auto"):
    """Returns `[batch, seq, q_heads, head_dim]` attention output in `q.dtype`.

    `q: [batch, seq, q_heads, head_dim]`, `k, v: [batch, seq, kv_heads, head_dim]` (GQA: q_heads a
    multiple of kv_heads), `segment_ids, positions: [batch, seq]` int32. `ring` runs over the mesh
    set with `jax.set_mesh` and expects tokens in its layout (`attention.layout.place`). `kernel`
    picks the per-block kernel of `blockwise` and `ring` (`attention.kernels`).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl={impl!r} is not one of {tuple(IMPLEMENTATIONS)}")
    if impl == "reference":
        return reference_attention(q, k, v, segment_ids=segment_ids, positions=positions, causal=causal)
    return IMPLEMENTATIONS[impl](q, k, v, segment_ids=segment_ids, positions=positions, causal=causal,
                                 block_size=block_size, kernel=kernel)
