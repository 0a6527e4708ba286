"""The accelerators lwm-jax knows, one entry each: memory, dense bf16 peak, link bandwidths and the
devices of a node, with one lookup by name and one by JAX `device_kind`. The planner, `doctor`, the
training metrics (MFU) and the scripts read every hardware figure from here.

Bandwidths are GB/s one device sends in one direction: `intra_node_gbps` over the fast links inside
a node (NVLink, PCIe where there is none, a TPU's ICI along one mesh axis), `inter_node_gbps` over
the network between nodes, `host_gbps` between a device and its host's memory (PCIe), which host
offload crosses. `host_memory_gib` is a device's share of its host's RAM, where host offload lands.
"""

from __future__ import annotations

import dataclasses
import math

from lwm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One device kind (`device_kinds`: substrings of JAX's `device_kind` that name it)."""

    name: str
    memory_gib: float
    peak_tflops: float  # dense bf16, per device
    intra_node_gbps: float
    inter_node_gbps: float
    host_gbps: float
    devices_per_node: int
    device_kinds: tuple[str, ...] = ()
    efficiency: float = 0.4  # the fraction of peak a well-tuned long-context step reaches (planner estimate)
    host_memory_gib: float = math.inf  # the host's RAM over its devices (inf: not bounded)

    @property
    def platform(self) -> str:
        """JAX's platform name for these devices: `tpu` or `gpu`."""
        return "tpu" if self.name.startswith("TPU") else "gpu"


# Figures from the vendors' spec sheets: NVIDIA's H100/H200/B200/A100/L40S datasheets (dense bf16
# Tensor Core peaks, i.e. half the "with sparsity" figure; NVLink bidirectional totals halved for one
# direction; PCIe 5.0 x16 ~64 GB/s, 4.0 x16 ~32 GB/s) and Google Cloud's TPU system-architecture pages
# (v4, v5e, v5p, v6e: peak bf16 per chip, HBM per chip; ICI per chip is the bidirectional total over
# its ports, so one mesh axis gets total / ports). Inter-node: one 400 Gb/s NIC per GPU (NDR
# InfiniBand; A100 nodes 200 Gb/s HDR); TPU slices stay on ICI. GiB where the compiler reports a
# usable figure (XLA:TPU refuses a v6e program above 31.25 GiB of its 32 GB). Host RAM per device: the
# cloud's standard machine for the part over its devices, GB read as 10^9 bytes where the listing says
# GB: a3-highgpu-8g 1,872 GB (H100), a3-ultragpu-8g 2,952 GB (H200), a4-highgpu-8g 3,968 GB (B200),
# a2-ultragpu-8g 1,360 GB (A100), AWS g6e.48xlarge 1,536 GiB (L40S), all for 8 GPUs; TPU VMs from the
# same TPU pages: v4 407 GB per 4 chips, v5e 512 GiB per 8, v5p 448 GB per 4, v6e 1,536 GiB per 8.
_GB = 1e9 / 2**30
HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    Hardware("H100", 80.0, 989.0, 450.0, 50.0, 64.0, 8, ("H100",), host_memory_gib=1872 / 8 * _GB),
    Hardware("H200", 141.0, 989.0, 450.0, 50.0, 64.0, 8, ("H200",), host_memory_gib=2952 / 8 * _GB),
    Hardware("B200", 180.0, 2250.0, 900.0, 50.0, 64.0, 8, ("B200",), host_memory_gib=3968 / 8 * _GB),
    Hardware("A100", 80.0, 312.0, 300.0, 25.0, 32.0, 8, ("A100",), host_memory_gib=1360 / 8 * _GB),
    # L40S: no NVLink, PCIe 4.0 between GPUs. TPUs: ICI per chip over its ports.
    Hardware("L40S", 48.0, 362.0, 32.0, 50.0, 32.0, 8, ("L40S",), host_memory_gib=1536 / 8),
    Hardware("TPU v4", 32.0, 275.0, 50.0, 50.0, 16.0, 4, ("TPU v4",), 0.45, 407 / 4 * _GB),  # 2,400 Gbps/6
    Hardware("TPU v5e", 16.0, 197.0, 100.0, 100.0, 32.0, 8, ("TPU v5 lite", "TPU v5e"), 0.45, 512 / 8),  # 400 GB/s/4
    Hardware("TPU v5p", 95.0, 459.0, 100.0, 100.0, 32.0, 4, ("TPU v5p", "TPU v5"), 0.45, 448 / 4 * _GB),  # 4,800 Gbps/6
    Hardware("TPU v6e", 31.25, 918.0, 200.0, 200.0, 64.0, 8, ("TPU v6 lite", "TPU v6e"), 0.45, 1536 / 8),  # 800 GB/s/4
)}


def get_hardware(name: str, flag: str = "--hardware") -> Hardware:
    """The entry named `name` (case-insensitive); a UserError naming `flag` and the known ones otherwise."""
    for key, hw in HARDWARE.items():
        if key.lower() == name.lower():
            return hw
    raise UserError(f"{flag} {name!r} is not one of {', '.join(HARDWARE)}")


def hardware_for_device(device_kind: str) -> Hardware | None:
    """The entry whose `device_kinds` best names JAX's `device_kind` string (the longest match, so
    'TPU v5 lite' is v5e and 'TPU v5' v5p); None for a device the table lacks (CPU, say)."""
    kind = device_kind.lower()
    matches = [(len(k), hw) for hw in HARDWARE.values() for k in hw.device_kinds if k.lower() in kind]
    return max(matches, key=lambda m: m[0])[1] if matches else None
