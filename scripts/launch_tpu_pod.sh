#!/usr/bin/env bash
# Runs the same lwm-jax command on every worker of a Cloud TPU VM pod slice.
# JAX detects the TPU pod itself (coordinator, process count and index), so no flags are needed.
#
# Usage: scripts/launch_tpu_pod.sh TPU_NAME ZONE [PROJECT] -- lwm-jax train configs/recipes/gradient_1048k.yaml
# Assumes the repository is checked out at the same path on every worker (e.g. by a startup
# script) and installed with `pip install -e '.[tpu]'`.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,8p' "$0"; exit 2
fi
tpu=$1; zone=$2; shift 2
project_flag=()
if [[ $1 != "--" ]]; then project_flag=(--project "$1"); shift; fi
[[ $1 == "--" ]] || { echo "expected -- before the command" >&2; exit 2; }
shift
repo=${LWM_JAX_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
printf -v cmd '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_flag[@]}" --worker=all \
  --command "cd $repo && source .venv/bin/activate 2>/dev/null; $cmd"
