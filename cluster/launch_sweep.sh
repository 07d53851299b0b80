#!/usr/bin/env bash
# Run an ablation sweep on an existing Ray cluster through the Jobs API, resume it, report it.
#
#   export RAY_ADDRESS=http://<head>:8265                      # the head's dashboard / Jobs API
#   export MLFLOW_TRACKING_URI=http://<mlflow-host>:5000       # an MLflow server the cluster's nodes reach
#   cluster/launch_sweep.sh submit  [experiments/sweeps/token_usage.yaml]   # start the sweep (streams its log)
#   cluster/launch_sweep.sh resume  [experiments/sweeps/token_usage.yaml]   # after a killed / failed driver
#   cluster/launch_sweep.sh report  [experiments/sweeps/token_usage.yaml]   # report/index.html + parent run
#
# STORAGE (default /mnt/shared/sweeps) must be a shared file system every node mounts at the same path (NFS, a
# PVC): the sweep folder <STORAGE>/<sweep name> holds Tune's state (what `--resume` reads back), the trials' run
# folders and checkpoints. The sweep name is the file's `name:` (the file's stem here). Ray 2.60 uses token auth:
# RAY_AUTH_MODE defaults to token here; the token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
# ~/.ray/auth_token (ask your cluster admin). The working dir (this repository minus .gitignore) is on every
# worker's PYTHONPATH, so `python -m perceive_ray` is `perceive-ray` without installing the package there.
set -euo pipefail

cd "$(dirname "$0")/.."
action=${1:-submit}
sweep_file=${2:-experiments/sweeps/token_usage.yaml}
sweep=$(basename "$sweep_file" .yaml)
storage=${STORAGE:-/mnt/shared/sweeps}
python=${PYTHON:-python3}  # an interpreter with ray (and so PyYAML) installed, like the one behind `ray`

die() { echo "launch_sweep.sh: $*" >&2; exit 2; }

[[ -n "${MLFLOW_TRACKING_URI:-}" ]] || die "MLFLOW_TRACKING_URI is not set: export the MLflow server the cluster \
reaches, e.g. export MLFLOW_TRACKING_URI=http://mlflow.example.internal:5000"
[[ "$MLFLOW_TRACKING_URI" != *@* ]] || die "MLFLOW_TRACKING_URI must not carry credentials (user:password@host); \
use MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD set on the cluster's nodes instead"
[[ -f "$sweep_file" ]] || die "no sweep file $sweep_file (see experiments/sweeps/)"

if [[ "$action" == report ]]; then
    # Runs here: reads the sweep's parent run and its children from MLflow, writes report/, logs it to the parent.
    ${PERCEIVE_RAY:-perceive-ray} report --sweep "$sweep" --out report/
    echo "open report/index.html; the parent run and one child per trial are on $MLFLOW_TRACKING_URI"
    exit 0
fi

[[ -n "${RAY_ADDRESS:-}" ]] || die "RAY_ADDRESS is not set: export the cluster's Jobs API address, \
e.g. export RAY_ADDRESS=http://<head>:8265"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

case "$action" in
    submit) resume=() ;;
    resume) resume=(--resume) ;;  # Tune restores the sweep from $storage: finished trials are not rerun
    *) die "unknown action '$action' (submit, resume or report)" ;;
esac

# cluster/runtime_env.yaml plus the MLflow address, so the driver and every trial see the same server.
runtime_env=$(mktemp "${TMPDIR:-/tmp}/perceive-sweep-env.XXXXXX")
trap 'rm -f "$runtime_env"' EXIT
"$python" - "$runtime_env" <<'PY' || die "could not write the runtime env (set PYTHON to an interpreter with ray)"
import os, sys, yaml
env = yaml.safe_load(open("cluster/runtime_env.yaml")) or {}
env.setdefault("env_vars", {})["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
yaml.safe_dump(env, open(sys.argv[1], "w"))
PY

ray job submit --address "$RAY_ADDRESS" --submission-id "sweep-$sweep-$(date +%Y%m%d-%H%M%S)" \
    --working-dir . --runtime-env "$runtime_env" -- \
    python -m perceive_ray sweep "$sweep_file" --storage "$storage" ${resume[@]+"${resume[@]}"}
# Ctrl-C stops following the log, not the job: `ray job list`, `ray job logs -f <id>`, `ray job stop <id>`.
# If the driver dies (job stopped, head restarted), run `cluster/launch_sweep.sh resume` with the same STORAGE.
