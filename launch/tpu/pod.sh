#!/usr/bin/env bash
# didi_jax on Cloud TPU VM slices: request them (queued resources, one or several slices), copy
# the checkout, and run the same command on every host of every slice via
# `gcloud compute tpus tpu-vm ssh --worker=all`. By default every host gets DIDI_COORDINATOR
# (worker 0 of slice 0), DIDI_NUM_PROCESSES (hosts of all slices) and DIDI_PROCESS_ID (slice ×
# hosts per slice + its agent-worker-number), so didi_jax.parallel.maybe_initialize_distributed
# calls jax.distributed.initialize() explicitly; with NUM_SLICES > 1 the MEGASCALE_* variables
# join the slices over the data-centre network (DIST_INIT=runtime leaves it all to the runtime).
#
#   python -m didi_jax.aot --config=configs/owt.py --topology=v5p-64       # first: does it fit?
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a PROJECT=my-project ACCELERATOR_TYPE=v5p-64 \
#     RUNTIME_VERSION=v2-alpha-tpuv5 launch/tpu/pod.sh create       # queued resource, waits
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a PROJECT=my-project launch/tpu/pod.sh setup
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a PROJECT=my-project WORKDIR=/mnt/shared/runs/owt \
#     launch/tpu/pod.sh run -- --config.teacher.checkpoint=hf:kuleshov-group/mdlm-owt
#
# See launch/tpu/README.md. No credentials are handled here: gcloud uses your own login.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/tpu/pod.sh {create|wait|status|setup|run|all|stop|delete} [-- MAIN_ARGS...]

  create  request the slice(s) as a queued resource (ACCELERATOR_TYPE, RUNTIME_VERSION;
          NUM_SLICES > 1: one multi-slice request), then wait until it is ACTIVE
  wait    wait until the queued resource is ACTIVE (fails if it FAILED or was SUSPENDED)
  status  print the queued resource's state
  setup   copy this checkout to every host (gcloud scp), create a venv there, install jax[tpu]
          and the package (pip install -e .)
  run     on every host: python -m didi_jax.main --config=$CONFIG --workdir=$WORKDIR MAIN_ARGS
  all     setup, then run
  stop    SIGTERM the run started by `run` on every host (by the PID it recorded); the training
          loops save a checkpoint and exit
  delete  delete the queued resource and its slices

Required environment:
  TPU_NAME   TPU VM name (with NUM_SLICES > 1 the slices are TPU_NAME-0 ... TPU_NAME-(N-1))
  ZONE       its zone            PROJECT  its GCP project
Optional environment:
  NUM_SLICES       slices joined over the data-centre network (default 1)
  QUEUED_RESOURCE  queued-resource id (default TPU_NAME-qr)
  ACCELERATOR_TYPE for create, per slice (e.g. v5p-128, v5litepod-256, v4-32)
  RUNTIME_VERSION  for create (the TPU VM software version of your generation)
  QR_FLAGS         extra flags for `queued-resources create` (e.g. "--spot" or
                   "--reserved"; "--valid-until-duration=6h")
  WAIT_S           how long create/wait wait for ACTIVE (default 86400)
  CONFIG           config and preset (default configs/owt.py)
  WORKDIR          run directory, the same path on every host and shared by all of them (NFS /
                   Filestore / gcsfuse mount); default /mnt/shared/didi_jax/runs/owt
  REMOTE_DIR       where the checkout goes on each host (default ~/didi_jax)
  JAX_SPEC         pip requirement for jax on TPU (default "jax[tpu]")
  LOG_FILE         per-host log of `run`, relative to REMOTE_DIR (default run.log)
  DIST_INIT        explicit (default): DIDI_* (and MEGASCALE_*) variables from `gcloud ...
                   describe` + the metadata server; runtime: set nothing (only
                   TPU_WORKER_HOSTNAMES / MEGASCALE_* trigger jax.distributed.initialize() in
                   didi_jax, else the TPU runtime alone forms the pod)
  COORDINATOR_PORT   port on slice 0's worker 0 for jax.distributed (default 8476)
  MEGASCALE_PORT     port for the multi-slice runtime (default 8080)
  DRY_RUN=1        print the gcloud commands instead of running them
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
  create|wait|status|setup|run|all|stop|delete) ;;
  *) echo "error: unknown action '${action}': use create, wait, status, setup, run, all, stop" \
          "or delete" >&2; usage >&2; exit 2 ;;
esac
if [[ "${1:-}" == "--" ]]; then
  shift
fi
if [[ "${action}" != "run" && "${action}" != "all" ]] && [[ $# -gt 0 ]]; then
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

num_slices="${NUM_SLICES:-1}"
queued_resource="${QUEUED_RESOURCE:-${TPU_NAME}-qr}"
config="${CONFIG:-configs/owt.py}"
workdir="${WORKDIR:-/mnt/shared/didi_jax/runs/owt}"
remote_dir="${REMOTE_DIR:-~/didi_jax}"
jax_spec="${JAX_SPEC:-jax[tpu]}"
log_file="${LOG_FILE:-run.log}"
dist_init="${DIST_INIT:-explicit}"
coordinator_port="${COORDINATOR_PORT:-8476}"
megascale_port="${MEGASCALE_PORT:-8080}"
wait_s="${WAIT_S:-86400}"
if ! [[ "${num_slices}" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NUM_SLICES=${num_slices}: use a positive integer" >&2
  exit 2
fi
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

# The TPU VM names: TPU_NAME for one slice, TPU_NAME-0 ... TPU_NAME-(N-1) for N slices (the
# names `queued-resources create --node-count=N --node-prefix=TPU_NAME` gives them).
nodes() {
  if (( num_slices == 1 )); then
    echo "${TPU_NAME}"
  else
    local i
    for (( i = 0; i < num_slices; i++ )); do echo "${TPU_NAME}-${i}"; done
  fi
}

on_all_workers() {   # NODE COMMAND
  run gcloud compute tpus tpu-vm ssh "$1" --zone="${ZONE}" --project="${PROJECT}" \
    --worker=all --command="$2"
}

qr_state() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo ACTIVE
    return
  fi
  gcloud compute tpus queued-resources describe "${queued_resource}" --zone="${ZONE}" \
    --project="${PROJECT}" --format='value(state.state)'
}

do_create() {
  if [[ -z "${ACCELERATOR_TYPE:-}" || -z "${RUNTIME_VERSION:-}" ]]; then
    echo "error: create needs ACCELERATOR_TYPE (e.g. v5p-128) and RUNTIME_VERSION (the TPU VM" \
         "software version for that generation)" >&2
    exit 2
  fi
  local where=(--node-id="${TPU_NAME}")
  if (( num_slices > 1 )); then
    where=(--node-count="${num_slices}" --node-prefix="${TPU_NAME}")
  fi
  local extra=()
  if [[ -n "${QR_FLAGS:-}" ]]; then
    read -r -a extra <<<"${QR_FLAGS}"
  fi
  run gcloud compute tpus queued-resources create "${queued_resource}" "${where[@]}" \
    --zone="${ZONE}" --project="${PROJECT}" --accelerator-type="${ACCELERATOR_TYPE}" \
    --runtime-version="${RUNTIME_VERSION}" "${extra[@]+"${extra[@]}"}"
  do_wait
}

do_wait() {
  local start=${SECONDS} state
  while true; do
    state="$(qr_state)"
    case "${state}" in
      ACTIVE) echo "queued resource ${queued_resource}: ACTIVE"; return 0 ;;
      FAILED|SUSPENDED)
        echo "error: queued resource ${queued_resource} is ${state}: see" \
             "gcloud compute tpus queued-resources describe ${queued_resource}" >&2
        exit 1 ;;
    esac
    if (( SECONDS - start > wait_s )); then
      echo "error: queued resource ${queued_resource} still ${state:-unknown} after ${wait_s} s" >&2
      exit 1
    fi
    echo "queued resource ${queued_resource}: ${state:-unknown}; waiting" >&2
    sleep 60
  done
}

do_setup() {
  local tarball node
  tarball="$(mktemp -t didi_jax_src_XXXXXX.tar.gz)"
  # The tracked and untracked-but-not-ignored files of this checkout (no venvs, no runs).
  (cd "${repo_root}" && git ls-files -co --exclude-standard -z \
     | tar --null -czf "${tarball}" -T -)
  while read -r node; do
    run gcloud compute tpus tpu-vm scp "${tarball}" "${node}:didi_jax_src.tar.gz" \
      --zone="${ZONE}" --project="${PROJECT}" --worker=all
    on_all_workers "${node}" "set -euo pipefail
      mkdir -p ${remote_dir} && tar -xzf ~/didi_jax_src.tar.gz -C ${remote_dir}
      cd ${remote_dir}
      python3 -m venv .venv && . .venv/bin/activate
      pip install -q -U pip
      pip install -q -U $(printf '%q' "${jax_spec}")
      pip install -q -e .
      python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
  done < <(nodes)
  rm -f "${tarball}"
}

# Worker internal IPs of one slice in worker order (gcloud's --worker=i is networkEndpoints[i]).
worker_ips() {   # NODE
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf 'WORKER0_IP\nWORKER1_IP\n'
    return
  fi
  gcloud compute tpus tpu-vm describe "$1" --zone="${ZONE}" --project="${PROJECT}" \
    --format='value(networkEndpoints[].ipAddress)' | tr ';,' '\n' | grep -v '^$'
}

do_run() {
  local args="" env_setup="" ips n coord coord_ip first slice=0 node pids=() status=0 pid
  if [[ $# -gt 0 ]]; then
    args="$(printf '%q ' "$@")"
  fi
  first="$(nodes | head -n 1)"
  ips="$(worker_ips "${first}")"
  n="$(grep -c . <<<"${ips}")"
  coord_ip="$(head -n 1 <<<"${ips}")"
  coord="${coord_ip}:${coordinator_port}"
  if (( n < 1 )); then
    echo "error: could not list the workers of ${first}: check TPU_NAME/ZONE/PROJECT" >&2
    exit 2
  fi
  while read -r node; do
    env_setup=""
    if [[ "${dist_init}" == "explicit" ]] && (( n * num_slices > 1 )); then
      env_setup="export DIDI_COORDINATOR=${coord} DIDI_NUM_PROCESSES=$(( n * num_slices ))
      worker=\$(curl -sf -H 'Metadata-Flavor: Google' http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)
      export DIDI_PROCESS_ID=\$(( ${slice} * ${n} + worker ))"
      if (( num_slices > 1 )); then
        env_setup="${env_setup}
      export MEGASCALE_COORDINATOR_ADDRESS=${coord_ip}:${megascale_port} MEGASCALE_NUM_SLICES=${num_slices} MEGASCALE_SLICE_ID=${slice} MEGASCALE_PORT=${megascale_port}"
      fi
    fi
    # One ssh per slice, all at once: each blocks until its hosts' run ends.
    on_all_workers "${node}" "set -euo pipefail
      cd ${remote_dir} && . .venv/bin/activate
      ${env_setup}
      mkdir -p $(printf '%q' "${workdir}")
      (python -m didi_jax.main --config=$(printf '%q' "${config}") \
        --workdir=$(printf '%q' "${workdir}") ${args} & echo \$! > didi_jax.pid; wait \$!) \
        2>&1 | tee ${log_file}" &
    pids+=("$!")
    slice=$(( slice + 1 ))
  done < <(nodes)
  for pid in "${pids[@]}"; do
    wait "${pid}" || status=$?
  done
  return "${status}"
}

do_stop() {
  local node
  while read -r node; do
    on_all_workers "${node}" \
      "cd ${remote_dir} && if [[ -f didi_jax.pid ]]; then kill -TERM \$(cat didi_jax.pid) || true; fi"
  done < <(nodes)
}

do_delete() {
  run gcloud compute tpus queued-resources delete "${queued_resource}" --zone="${ZONE}" \
    --project="${PROJECT}" --force --quiet
}

case "${action}" in
  create) do_create ;;
  wait) do_wait ;;
  status) run gcloud compute tpus queued-resources describe "${queued_resource}" \
            --zone="${ZONE}" --project="${PROJECT}" ;;
  setup) do_setup ;;
  run) do_run "$@" ;;
  all) do_setup; do_run "$@" ;;
  stop) do_stop ;;
  delete) do_delete ;;
esac
