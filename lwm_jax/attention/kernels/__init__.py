"""Per-block attention kernels behind one small interface (`base.Kernel`), one per platform: the
pure-JAX `XlaKernel` (everywhere; its blocks in `xla` are also the default backward), `cudnn`
(GPU) and `splash` (TPU). This module is the registry: it names the kernels and picks one per call.
The names a config accepts (`config.ATTENTION_KERNELS`) are this registry's, checked at import.
"""

from __future__ import annotations

from lwm_jax.attention.kernels.base import XLA, Kernel, XlaKernel
from lwm_jax.attention.kernels.cudnn import CUDNN
from lwm_jax.attention.kernels.pallas import PALLAS
from lwm_jax.attention.kernels.rows import (
    LSE_EMPTY,
    Meta,
    Tiling,
    ids_to_kv,
    ids_to_rows,
    kv_to_rows,
    q_to_rows,
    rows_to_kv,
    rows_to_q,
)
from lwm_jax.attention.kernels.splash import SPLASH
from lwm_jax.config import ATTENTION_KERNELS
from lwm_jax.errors import UserError
from lwm_jax.parallel.mesh import mesh_platform

__all__ = ["LSE_EMPTY", "XLA", "Kernel", "Meta", "XlaKernel", "Tiling", "get_kernel", "ids_to_kv", "ids_to_rows",
           "kernel_names", "kv_to_rows", "q_to_rows", "rows_to_kv", "rows_to_q", "select_kernel"]

_KERNELS: dict[str, Kernel] = {k.name: k for k in (XLA, CUDNN, SPLASH, PALLAS)}
assert ("auto", *_KERNELS) == ATTENTION_KERNELS, "config.ATTENTION_KERNELS must name exactly these kernels"
# Tried in this order by `kernel="auto"` on each platform, each with whether it serves only calls that
# merge nothing (its whole-call path): cuDNN whole calls on GPU, the Pallas kernel for every ring and
# Ulysses step on GPU (Triton) and TPU (Mosaic); `xla` is always the last resort.
_AUTO: dict[str, tuple[tuple[str, bool], ...]] = {"gpu": (("cudnn", True), ("pallas", False)),
                                                  "tpu": (("pallas", False),)}


def kernel_names() -> tuple[str, ...]:
    return tuple(_KERNELS)


def get_kernel(name: str) -> Kernel:
    if name not in _KERNELS:
        raise UserError(f"attention kernel={name!r} is not one of {('auto',) + tuple(_KERNELS)}")
    return _KERNELS[name]


def select_kernel(name: str | Kernel, *, dtype, head_dim: int, segments: bool, whole: bool = False,
                  platform: str | None = None) -> Kernel:
    """The kernel for a call: `auto` picks the platform's fused kernel when it supports the call
    (else `xla`), a whole-call kernel only for a call that merges nothing (`whole`); a named kernel
    (or a `Kernel` given as such) that cannot run the call is an error. `platform`: the devices' the
    program is lowered for (default: the mesh's, `parallel.mesh.mesh_platform`)."""
    platform = platform or mesh_platform()
    if name == "auto":
        for candidate, whole_only in _AUTO.get(platform, ()):
            kernel = _KERNELS[candidate]
            runs_here = not kernel.platforms or platform in kernel.platforms
            if (whole or not whole_only) and runs_here and kernel.supports(
                    dtype=dtype, head_dim=head_dim, segments=segments) is None:
                return kernel
        return _KERNELS["xla"]
    kernel = name if isinstance(name, Kernel) else get_kernel(name)
    name = kernel.name
    if kernel.platforms and platform not in kernel.platforms:
        raise UserError(f"attention kernel={name!r} runs on {'/'.join(kernel.platforms)}, "
                        f"not on {platform}; use kernel='auto' or 'xla'")
    why = kernel.supports(dtype=dtype, head_dim=head_dim, segments=segments)
    if why is not None:
        raise UserError(f"attention kernel={name!r} cannot run this call: {why}")
    return kernel
