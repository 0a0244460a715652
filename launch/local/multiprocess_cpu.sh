#!/usr/bin/env bash
# Runs N CPU processes of `python -m didi_jax.main` on this machine, wired together with
# jax.distributed (DIDI_COORDINATOR / DIDI_NUM_PROCESSES / DIDI_PROCESS_ID), each process
# faking K CPU devices. Exercises the multi-host code paths (global batches assembled from
# per-process rows, sharded checkpoints written by every process) without a cluster.
#
#   launch/local/multiprocess_cpu.sh -n 2 -k 2 -- \
#       --config=configs/demo.py:smoke --workdir=/tmp/mp_smoke \
#       --config.job=pretrain --config.pretrain.num_steps=4
#
# Every argument after `--` goes to `python -m didi_jax.main` (or `-m MODULE`) unchanged. Logs: one file per
# process in the log dir (default: a fresh mktemp dir, printed at start); process 0's log
# is also streamed to stdout. Exits 0 only if every process exits 0; if one fails, the others are
# stopped (by their own PIDs) and the first failure's status is returned.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local/multiprocess_cpu.sh [-n NUM_PROCESSES] [-k DEVICES_PER_PROCESS] [-p PORT]
                                        [-l LOG_DIR] [-t TIMEOUT_S] [-m MODULE] -- MAIN_ARGS...

  -n  processes to start (default 2; env NUM_PROCESSES)
  -k  fake CPU devices per process, via XLA_FLAGS (default 2; env DEVICES_PER_PROCESS)
  -p  coordinator port on localhost (default: a free port; env PORT)
  -l  directory for per-process logs (default: a fresh mktemp dir; env LOG_DIR)
  -t  kill everything after this many seconds (default 0 = no limit; env TIMEOUT_S)
  -m  Python module every process runs (default didi_jax.main; env MODULE), e.g. a test worker
Ctrl-C / SIGTERM: forwarded as SIGTERM (checkpoint, then exit); SIGKILL after STOP_GRACE_S (120).
  MAIN_ARGS  passed to `python -m MODULE` (e.g. --config=configs/demo.py:smoke
             --workdir=/tmp/run --config.job=pretrain)

Python: $PYTHON, else the repo's .venv/bin/python, else python3.
EOF
}

num_processes="${NUM_PROCESSES:-2}"
devices_per_process="${DEVICES_PER_PROCESS:-2}"
port="${PORT:-}"
log_dir="${LOG_DIR:-}"
timeout_s="${TIMEOUT_S:-0}"
module="${MODULE:-didi_jax.main}"

while getopts ":n:k:p:l:t:m:h" opt; do
  case "${opt}" in
    n) num_processes="${OPTARG}" ;;
    k) devices_per_process="${OPTARG}" ;;
    p) port="${OPTARG}" ;;
    l) log_dir="${OPTARG}" ;;
    t) timeout_s="${OPTARG}" ;;
    m) module="${OPTARG}" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ "${1:-}" == "--" ]]; then
  shift
fi
if [[ $# -eq 0 ]]; then
  echo "error: no arguments for ${module}: add -- --config=... --workdir=..." >&2
  usage >&2
  exit 2
fi
for v in "${num_processes}" "${devices_per_process}" "${timeout_s}"; do
  if ! [[ "${v}" =~ ^[0-9]+$ ]]; then
    echo "error: -n, -k and -t take non-negative integers (got '${v}')" >&2
    exit 2
  fi
done
if (( num_processes < 1 || devices_per_process < 1 )); then
  echo "error: -n and -k must be at least 1" >&2
  exit 2
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "${repo_root}/.venv/bin/python" ]]; then
    PYTHON="${repo_root}/.venv/bin/python"
  else
    PYTHON="python3"
  fi
fi
if [[ -z "${port}" ]]; then
  port="$("${PYTHON}" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1]); s.close()')"
fi
if [[ -z "${log_dir}" ]]; then
  log_dir="$(mktemp -d -t didi_mp_XXXXXX)"
fi
mkdir -p "${log_dir}"

echo "multiprocess_cpu: ${num_processes} processes x ${devices_per_process} CPU devices," \
     "coordinator localhost:${port}, logs in ${log_dir}"

pids=()
tail_pid=""
cleanup() {
  for pid in "${pids[@]+"${pids[@]}"}"; do
    kill "${pid}" 2>/dev/null || true
  done
}
# On Ctrl-C / SIGTERM: pass SIGTERM on (the training loops save a checkpoint at the next step
# and exit), wait up to STOP_GRACE_S seconds (default 120), then SIGKILL what is left.
# shellcheck disable=SC2317  # reached through the trap below
on_signal() {
  echo "multiprocess_cpu: stopping; the processes save a checkpoint first" >&2
  cleanup
  local deadline=$((SECONDS + ${STOP_GRACE_S:-120}))
  for pid in "${pids[@]+"${pids[@]}"}"; do
    while kill -0 "${pid}" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.5; done
    kill -KILL "${pid}" 2>/dev/null || true
  done
  if [[ -n "${tail_pid}" ]]; then kill "${tail_pid}" 2>/dev/null || true; fi
  exit 130
}
trap on_signal INT TERM

xla_flags="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices_per_process}"
for (( i = 0; i < num_processes; i++ )); do
  (
    cd "${repo_root}"
    export JAX_PLATFORMS=cpu
    export XLA_FLAGS="${xla_flags}"
    export DIDI_COORDINATOR="localhost:${port}"
    export DIDI_NUM_PROCESSES="${num_processes}"
    export DIDI_PROCESS_ID="${i}"
    exec "${PYTHON}" -m "${module}" "$@"
  ) >"${log_dir}/process_${i}.log" 2>&1 &
  pids+=("$!")
done

# Stream process 0's log while the run goes on.
tail -n +1 -F "${log_dir}/process_0.log" 2>/dev/null &
tail_pid=$!

start=${SECONDS}
status=0
remaining=("${pids[@]}")
while (( ${#remaining[@]} > 0 )); do
  still=()
  for pid in "${remaining[@]}"; do
    if kill -0 "${pid}" 2>/dev/null; then
      still+=("${pid}")
    else
      rc=0
      wait "${pid}" || rc=$?
      if (( rc != 0 && status == 0 )); then
        status=${rc}
        echo "multiprocess_cpu: process with pid ${pid} exited with status ${rc};" \
             "stopping the others" >&2
        cleanup
      fi
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  if (( timeout_s > 0 && SECONDS - start > timeout_s && ${#remaining[@]} > 0 )); then
    echo "multiprocess_cpu: timed out after ${timeout_s} s; stopping all processes" >&2
    cleanup
    status=124
    for pid in "${remaining[@]}"; do wait "${pid}" 2>/dev/null || true; done
    break
  fi
  sleep 0.5
done

kill "${tail_pid}" 2>/dev/null || true
wait "${tail_pid}" 2>/dev/null || true
if (( status != 0 )); then
  for (( i = 1; i < num_processes; i++ )); do
    echo "---- tail of ${log_dir}/process_${i}.log" >&2
    tail -n 20 "${log_dir}/process_${i}.log" >&2 || true
  done
fi
echo "multiprocess_cpu: exit status ${status}"
exit "${status}"
