#!/usr/bin/env bash
# One prepared device check, at most 8 minutes on one H100/H200: `lwm-jax doctor`; the attention
# kernel against cuDNN (bf16, 65,536 tokens, Llama-3-8B heads) and cuDNN's paths against the dense
# reference (scripts/check_cudnn_attention.py, GPU only); 3 train steps of a Llama-3.2-1B-shaped
# model at the longest sequence the planner says fits one GPU (peak memory against the plan, tokens/s,
# MFU); prefill and decode rates from a 131,072-token prompt. It writes every part's JSON and log,
# OUT/device_check.json and OUT/device_check.md (the table for the README's "Running on GPUs and
# TPUs" section) into the output folder.
#
# Usage: scripts/device_check.sh [--tiny] [--out DIR]      (default DIR: device_check_out)
#   --tiny   the same steps at toy sizes on CPU (8 simulated devices for doctor and the attention
#            benchmark); tests/test_doctor.py runs it so this script never rots.
#
# Python: $PYTHON when set; else the repository's .venv when it imports lwm_jax; else python3 when it
# does (a machine's own JAX, e.g. a GPU image's JAX with its CUDA plugin); else a venv made in
# $LWM_VENV (default .venv-device) on top of python3's packages, with `pip install -e .[gpu]`, or,
# on a machine without network, with the wheels in $LWM_WHEELS installed --no-index --no-deps.
# Each part has its own time limit; a part that fails is reported as failed and the rest still run
# (exit status 1 then).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TINY=0
OUT="device_check_out"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tiny) TINY=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[[ $TINY == 1 ]] && export JAX_PLATFORMS=cpu

imports_lwm() { "$1" -c "import lwm_jax.cli" >/dev/null 2>&1; }

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]] && imports_lwm "$ROOT/.venv/bin/python"; then
  PY="$ROOT/.venv/bin/python"
elif imports_lwm python3; then
  PY=python3
else
  VENV="${LWM_VENV:-$ROOT/.venv-device}"
  echo "== making $VENV (python3's packages visible)"
  python3 -m venv --system-site-packages "$VENV" || exit 1
  if [[ -n "${LWM_WHEELS:-}" ]]; then
    "$VENV/bin/pip" install -q --no-index --no-deps "$LWM_WHEELS"/*.whl || exit 1
  elif [[ $TINY == 1 ]]; then
    "$VENV/bin/pip" install -q -e "$ROOT" || exit 1
  else
    "$VENV/bin/pip" install -q -e "$ROOT[gpu]" || exit 1
  fi
  PY="$VENV/bin/python"
fi
echo "== python: $PY ($("$PY" -c 'import jax; print("jax", jax.__version__, "on", jax.default_backend())'))"
if [[ $TINY == 0 ]] && [[ "$("$PY" -c 'import jax; print(jax.default_backend())')" == cpu ]]; then
  echo "device_check.sh: JAX sees no accelerator here; install the gpu extra (README) or use --tiny" >&2
  exit 2
fi

FAILED=()
# part NAME LIMIT_S COMMAND...: runs one part under a time limit, its output in OUT/NAME.log.
part() {
  local name="$1" limit="$2"
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -v '^\[Gloo\]' "$OUT/$name.log" | tail -n 25
  echo "== $name: exit $rc after $((SECONDS - start))s"
  [[ $rc == 0 ]] || FAILED+=("$name")
  return $rc
}
# The last line of a part's log is its JSON object (doctor and bench_attention print it last).
last_json() { [[ $1 == 0 ]] && tail -n 1 "$OUT/$2.log" >"$OUT/$2.json"; }

if [[ $TINY == 1 ]]; then
  part doctor 120 "$PY" -m lwm_jax.cli --cpu-devices 8 doctor --mesh dp=2,sp=4 --json; last_json $? doctor
  part attention 180 "$PY" "$ROOT/scripts/bench_attention.py" --seq 512 --heads 8 --kv-heads 2 --head-dim 32 \
    --block 64 --rounds 1 --meshes "sp=8;ulysses=2,sp=4" --no-anchor --no-dense --memory-seqs "" --max-gemm 1024 \
    --json; last_json $? attention
  part train 180 "$PY" "$ROOT/scripts/device_train_check.py" train --tiny --out "$OUT"
  part generate 120 "$PY" "$ROOT/scripts/device_train_check.py" generate --tiny --out "$OUT"
else
  part doctor 60 "$PY" -m lwm_jax.cli doctor --json; last_json $? doctor
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # the rest runs on one GPU
  part attention 180 "$PY" "$ROOT/scripts/bench_attention.py" --gpu --gpu-seqs 65536,131072 --rounds 3 --json
  last_json $? attention
  part cudnn_check 60 "$PY" "$ROOT/scripts/check_cudnn_attention.py"  # correctness; exit 1 on a miss
  part train 180 "$PY" "$ROOT/scripts/device_train_check.py" train --out "$OUT"
  part generate 60 "$PY" "$ROOT/scripts/device_train_check.py" generate --out "$OUT"
fi
"$PY" "$ROOT/scripts/device_train_check.py" report --out "$OUT"
echo "== wrote $OUT/device_check.json and $OUT/device_check.md"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "device_check.sh: failed: ${FAILED[*]}" >&2
  exit 1
fi
