#!/usr/bin/env bash
# didi_jax on a Cloud TPU VM pod slice: the same command on every host via
# `gcloud compute tpus tpu-vm ssh --worker=all`. By default every host gets DIDI_COORDINATOR
# (worker 0's internal IP), DIDI_NUM_PROCESSES (the worker count) and DIDI_PROCESS_ID (its
# agent-worker-number from the TPU VM metadata), so didi_jax.parallel.maybe_initialize_distributed
# calls jax.distributed.initialize() explicitly (DIST_INIT=runtime leaves it to the TPU runtime).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a PROJECT=my-project launch/tpu/pod.sh setup
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a PROJECT=my-project WORKDIR=/mnt/shared/runs/owt \
#     launch/tpu/pod.sh run -- --config.teacher.checkpoint=hf:kuleshov-group/mdlm-owt
#
# See launch/tpu/README.md. No credentials are handled here: gcloud uses your own login.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/tpu/pod.sh {setup|run|all|stop} [-- MAIN_ARGS...]

  setup  copy this checkout to every host (gcloud scp), create a venv there, install jax[tpu]
         and the package (pip install -e .)
  run    on every host: python -m didi_jax.main --config=$CONFIG --workdir=$WORKDIR MAIN_ARGS
  all    setup, then run
  stop   SIGTERM the run started by `run` on every host (by the PID it recorded); the training
         loops save a checkpoint and exit

Required environment:
  TPU_NAME   TPU VM name          ZONE  its zone          PROJECT  its GCP project
Optional environment:
  CONFIG       config and preset (default configs/owt.py)
  WORKDIR      run directory, the same path on every host and shared by all of them (NFS /
               Filestore / gcsfuse mount); default /mnt/shared/didi_jax/runs/owt
  REMOTE_DIR   where the checkout goes on each host (default ~/didi_jax)
  JAX_SPEC     pip requirement for jax on TPU (default "jax[tpu]")
  LOG_FILE     per-host log of `run`, relative to REMOTE_DIR (default run.log)
  DIST_INIT    explicit (default): DIDI_* variables from `gcloud ... describe` + the metadata
               server; runtime: set nothing (only TPU_WORKER_HOSTNAMES / MEGASCALE_* trigger
               jax.distributed.initialize() in didi_jax, else the TPU runtime alone forms the pod)
  COORDINATOR_PORT  port on worker 0 for DIST_INIT=explicit (default 8476)
  DRY_RUN=1    print the gcloud commands instead of running them
USAGE
}

if [[ $# -lt 1 ]]; then
  usage >&2
  exit 2
fi
action="$1"
shift
case "${action}" in
  -h|--help) usage; exit 0 ;;
  setup|run|all|stop) ;;
  *) echo "error: unknown action '${action}': use setup, run, all or stop" >&2; usage >&2; exit 2 ;;
esac
if [[ "${1:-}" == "--" ]]; then
  shift
fi
if [[ "${action}" == "setup" || "${action}" == "stop" ]] && [[ $# -gt 0 ]]; then
  echo "error: '${action}' takes no didi_jax arguments (got: $*)" >&2
  exit 2
fi

missing=()
for v in TPU_NAME ZONE PROJECT; do
  if [[ -z "${!v:-}" ]]; then
    missing+=("${v}")
  fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "error: set ${missing[*]} (e.g. TPU_NAME=my-v5p-64 ZONE=us-east5-a PROJECT=my-project)" >&2
  exit 2
fi

config="${CONFIG:-configs/owt.py}"
workdir="${WORKDIR:-/mnt/shared/didi_jax/runs/owt}"
remote_dir="${REMOTE_DIR:-~/didi_jax}"
jax_spec="${JAX_SPEC:-jax[tpu]}"
log_file="${LOG_FILE:-run.log}"
dist_init="${DIST_INIT:-explicit}"
coordinator_port="${COORDINATOR_PORT:-8476}"
if [[ "${dist_init}" != "explicit" && "${dist_init}" != "runtime" ]]; then
  echo "error: DIST_INIT=${dist_init}: use explicit or runtime" >&2
  exit 2
fi
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

if [[ "${workdir}" == gs://* ]]; then
  echo "error: WORKDIR=${workdir}: gs:// paths are not supported yet (checkpoint manager uses " \
       "local paths); mount the bucket with gcsfuse or use Filestore and pass the mount path" >&2
  exit 2
fi

run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
    --worker=all --command="$1"
}

do_setup() {
  local tarball
  tarball="$(mktemp -t didi_jax_src_XXXXXX.tar.gz)"
  # The tracked and untracked-but-not-ignored files of this checkout (no venvs, no runs).
  (cd "${repo_root}" && git ls-files -co --exclude-standard -z \
     | tar --null -czf "${tarball}" -T -)
  run gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:didi_jax_src.tar.gz" \
    --zone="${ZONE}" --project="${PROJECT}" --worker=all
  rm -f "${tarball}"
  on_all_workers "set -euo pipefail
    mkdir -p ${remote_dir} && tar -xzf ~/didi_jax_src.tar.gz -C ${remote_dir}
    cd ${remote_dir}
    python3 -m venv .venv && . .venv/bin/activate
    pip install -q -U pip
    pip install -q -U $(printf '%q' "${jax_spec}")
    pip install -q -e .
    python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
}

# Worker internal IPs in worker order (gcloud's --worker=i is networkEndpoints[i]).
worker_ips() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf 'WORKER0_IP\nWORKER1_IP\n'
    return
  fi
  gcloud compute tpus tpu-vm describe "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
    --format='value(networkEndpoints[].ipAddress)' | tr ';,' '\n\n' | grep -v '^$'
}

do_run() {
  local args="" env_setup=""
  if [[ $# -gt 0 ]]; then
    args="$(printf '%q ' "$@")"
  fi
  if [[ "${dist_init}" == "explicit" ]]; then
    local ips n coord
    ips="$(worker_ips)"
    n="$(grep -c . <<<"${ips}")"
    coord="$(head -n 1 <<<"${ips}"):${coordinator_port}"
    if (( n < 1 )); then
      echo "error: could not list the workers of ${TPU_NAME}: check TPU_NAME/ZONE/PROJECT" >&2
      exit 2
    fi
    env_setup="export DIDI_COORDINATOR=${coord} DIDI_NUM_PROCESSES=${n}
    DIDI_PROCESS_ID=\$(curl -sf -H 'Metadata-Flavor: Google' http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)
    export DIDI_PROCESS_ID"
    if (( n == 1 )); then
      env_setup=""          # one host: no jax.distributed needed
    fi
  fi
  on_all_workers "set -euo pipefail
    cd ${remote_dir} && . .venv/bin/activate
    ${env_setup}
    mkdir -p $(printf '%q' "${workdir}")
    (python -m didi_jax.main --config=$(printf '%q' "${config}") \
      --workdir=$(printf '%q' "${workdir}") ${args} & echo \$! > didi_jax.pid; wait \$!) \
      2>&1 | tee ${log_file}"
}

do_stop() {
  on_all_workers "cd ${remote_dir} && if [[ -f didi_jax.pid ]]; then kill -TERM \$(cat didi_jax.pid) || true; fi"
}

case "${action}" in
  setup) do_setup ;;
  run) do_run "$@" ;;
  all) do_setup; do_run "$@" ;;
  stop) do_stop ;;
esac
