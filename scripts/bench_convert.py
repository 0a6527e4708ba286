"""Peak host memory and time of `lwm-jax import-hf` and `export-hf` at real size.

Makes a randomly initialised Hugging Face Llama folder of the chosen shape (bf16 safetensors written
by the `safetensors` library, as `save_pretrained` lays them out), then runs `import-hf` and
`export-hf` each in a fresh process and reads that process's peak RSS from the kernel (`wait4`).
The same two commands on a 2-layer toy model give the fixed overhead (Python, JAX, orbax, the CLI)
in the same run; the ratio is (peak - overhead) / largest tensor, where the largest tensor is the
largest param leaf of the checkpoint (float32 master, layers stacked). Finally the exported
tensors are compared bit for bit with the original ones.

    python scripts/bench_convert.py --shape llama-3.2-1b [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

SHAPES = {
    # Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B), weights random.
    "llama-3.2-1b": dict(vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_theta=500_000.0, max_position_embeddings=131_072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # A mid-size shape (0.2B) to try the script quickly.
    "small": dict(vocab_size=32_000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False,
                  rope_theta=500_000.0, max_position_embeddings=8192, rope_scaling=None),
    # The fixed-overhead probe: the same commands on a model too small to matter.
    "toy": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
                rope_theta=500_000.0, max_position_embeddings=8192, rope_scaling=None),
}


def hf_tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    d, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], d)
    return shapes


def largest_leaf_bytes(c: dict) -> int:
    """Bytes of the largest float32 param leaf of the checkpoint (per-layer weights stacked)."""
    d, f, hd, n = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["num_hidden_layers"]
    return 4 * max(c["vocab_size"] * d, n * d * f, n * d * c["num_attention_heads"] * hd)


def make_hf_folder(out: Path, c: dict, seed: int = 0) -> dict:
    """Writes config.json and model.safetensors (bf16, random) to `out`; returns the shape figures."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in hf_tensor_shapes(c).items():
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
        else:
            value = 0.02 * rng.standard_normal(shape, np.float32)
        tensors[name] = value.astype(ml_dtypes.bfloat16)
        del value
    safetensors.numpy.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "bos_token_id": 128_000 if c["vocab_size"] > 128_000 else 0,
              "eos_token_id": [128_001, 128_008, 128_009] if c["vocab_size"] > 128_009 else 1,
              "torch_dtype": "bfloat16", **c}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    params = sum(math.prod(v.shape) for v in tensors.values())
    largest_hf = max(v.nbytes for v in tensors.values())
    return {"params": params, "file_bytes": (out / "model.safetensors").stat().st_size,
            "largest_hf_tensor_bytes": largest_hf, "largest_leaf_bytes": largest_leaf_bytes(c)}


CHILD = {"import": "from lwm_jax.convert.hf import import_hf_checkpoint as f; f({0!r}, {1!r})",
         "export": "from lwm_jax.convert.hf import export_hf_checkpoint as f; f({0!r}, {1!r})"}


def run_measured(direction: str, src: Path, dst: Path) -> tuple[float, int]:
    """`(seconds, peak RSS bytes)` of the library function behind `lwm-jax import-hf` / `export-hf`
    (each CLI handler calls exactly it) run in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD[direction].format(str(src), str(dst))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{direction} of {src} failed ({proc.returncode}):\n{stderr}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports kilobytes


def bit_exact(a: Path, b: Path) -> bool:
    """Whether every tensor of HF folder `a` is in `b` with the same dtype, shape and bytes."""
    def files(folder):
        found = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safetensors.safe_open(path, framework="numpy") as f:
                found.update(dict.fromkeys(f.keys(), path))  # a safe_open handle is not iterable
        return found
    fa, fb = files(a), files(b)
    if set(fa) != set(fb):
        return False
    for name in fa:
        with safetensors.safe_open(fa[name], framework="numpy") as x, safetensors.safe_open(fb[name], "numpy") as y:
            u, v = x.get_tensor(name), y.get_tensor(name)
            if u.dtype != v.dtype or u.shape != v.shape or u.tobytes() != v.tobytes():
                return False
    return True


def convert_both_ways(root: Path, shape: str) -> dict:
    hf, ckpt, out = root / f"{shape}-hf", root / f"{shape}-ckpt", root / f"{shape}-out"
    figures = make_hf_folder(hf, SHAPES[shape])
    figures["import_s"], figures["import_peak_rss"] = run_measured("import", hf, ckpt)
    figures["export_s"], figures["export_peak_rss"] = run_measured("export", ckpt, out)
    figures["bit_exact"] = bit_exact(hf, out)
    for path in (hf, ckpt, out):
        shutil.rmtree(path)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "toy"], default="llama-3.2-1b")
    parser.add_argument("--workdir", help="where the HF folders and checkpoint go (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    try:
        toy = convert_both_ways(root, "toy")
        big = convert_both_ways(root, args.shape)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    largest = big["largest_leaf_bytes"]
    result = {"shape": args.shape, "params": big["params"], "file_bytes": big["file_bytes"],
              "largest_leaf_bytes": largest, "largest_hf_tensor_bytes": big["largest_hf_tensor_bytes"],
              "bit_exact": big["bit_exact"] and toy["bit_exact"], "cpus": os.cpu_count()}
    gb = 1e9
    print(f"{args.shape}: {big['params']:,} params, file {big['file_bytes'] / gb:.2f} GB, largest param leaf "
          f"{largest / gb:.2f} GB (float32), largest HF tensor {big['largest_hf_tensor_bytes'] / gb:.2f} GB")
    print(f"{'direction':<10} {'seconds':>8} {'peak RSS GB':>12} {'overhead GB':>12} {'(peak-overhead)/largest':>24}")
    for direction in ("import", "export"):
        peak, overhead = big[f"{direction}_peak_rss"], toy[f"{direction}_peak_rss"]
        ratio = (peak - overhead) / largest
        result.update({f"{direction}_s": round(big[f"{direction}_s"], 2), f"{direction}_peak_rss": peak,
                       f"{direction}_overhead_rss": overhead, f"{direction}_ratio": round(ratio, 3),
                       f"{direction}_peak_over_file": round(peak / big["file_bytes"], 3)})
        print(f"{direction + '-hf':<10} {big[f'{direction}_s']:>8.1f} {peak / gb:>12.2f} {overhead / gb:>12.2f} "
              f"{ratio:>24.2f}")
    print(f"bf16 round trip bit-exact: {result['bit_exact']}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
