"""Training metrics: FLOPs per token, the peak FLOP/s of the device, MFU, and the writers
(`metrics.jsonl` plus TensorBoard event files, from process 0 only).

FLOPs convention (stated once, used everywhere): per trained token, `6 * N_matmul` for the weight
matmuls (forward 2N, backward 4N; embedding lookup excluded, output head included) plus
`6 * layers * seq_len * q_heads * head_dim` for causal attention (the score and value matmuls over
the half of the square that is not masked). Rematerialised recompute is not counted.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lwm_jax.config import ModelConfig
from lwm_jax.hardware import hardware_for_device


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token under the convention in the module docstring."""
    d, hd, f = config.hidden_size, config.head_dim, config.intermediate_size
    per_layer = d * hd * (2 * config.num_heads + 2 * config.num_kv_heads) + 3 * d * f
    n_matmul = config.num_layers * per_layer + d * config.vocab_size
    attention = config.num_layers * seq_len * config.num_heads * hd
    return 6.0 * n_matmul + 6.0 * attention


@functools.cache
def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """This machine's float32 matmul rate on one device (FLOP/s, best of `repeats`)."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def device_peak_flops(device) -> tuple[float, str]:
    """(dense peak FLOP/s of one device, where the figure came from): the hardware table's dense
    bf16 peak on an accelerator it knows; elsewhere the measured float32 matmul rate of this machine
    (simulated CPU devices share the same cores, so that rate is the whole machine's)."""
    hw = hardware_for_device(device.device_kind) if device.platform != "cpu" else None
    if hw is not None:
        return hw.peak_tflops * 1e12, f"table ({hw.name})"
    return measured_matmul_flops(), f"measured float32 matmul rate ({device.device_kind})"


def peak_flops(override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of all devices together, where the figure came from): the override or the
    table figure per device times the device count; on CPU the machine's measured rate."""
    devices = jax.devices()
    if override_tflops:
        return override_tflops * 1e12 * len(devices), "configured"
    flops, source = device_peak_flops(devices[0])
    if source.startswith("table"):
        return flops * len(devices), f"{source[:-1]} x {len(devices)})"
    return flops, source


class MetricsWriter:
    """Appends one JSON object per step to `metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # slow to import (~2 s): only when metrics are written

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def drop_after(self, stage: str, step: int) -> None:
        """Forgets logged steps of `stage` beyond `step` (they are redone after a resume)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line and not (json.loads(line)["stage"] == stage and json.loads(line)["step"] > step)]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any], global_step: int) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float, np.floating)) and key not in ("step",):
                self._tb.add_scalar(f"{record['stage']}/{key}", float(value), global_step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
