#!/usr/bin/env bash
# Run `python -m pgpc_jax.main` as N processes on this machine's CPU, each with its own share of
# fake CPU devices, as the hosts of a TPU pod slice or of a multi-node GPU job do: a rehearsal
# of a multi-process run (and what the two-process test runs).
#
# Needs: bash, Python with this project's requirements (the interpreter is $PYTHON, default
# `python`, else `python3`). Run it from anywhere: the project's root goes on PYTHONPATH, and
# relative paths in main's arguments are relative to the current folder.
#
# Usage:
#   launch/local_processes.sh N [options] -- --config configs/X.py --workdir DIR [--config.k=v ...]
# Everything after `--` goes to `python -m pgpc_jax.main` in every process; the script adds
# --coordinator_address localhost:PORT --num_processes N --process_id i (0 .. N-1).
# Options:
#   --devices_per_process D   fake CPU devices per process (default 4): N x D devices in all
#   --port P                  the coordinator's port (default: a free one)
#   --log_dir DIR             where processes 1 .. N-1 write their output (default: a new
#                             temporary folder, named at the start)
#   --dry-run                 print every command (lines starting with "+ ") and run none
#
# Output: process 0's output (the progress lines, the evaluation tables) goes to this script's
# stdout and stderr; process i > 0 writes stdout and stderr to DIR/process_<i>.log (not into the
# workdir, which only process 0 writes besides the checkpoints, and which may be gs://).
# The script waits for all N; when one fails, it stops the others and exits with the failed
# process's exit status (2: bad input, see its one error line), naming its log. Ctrl-C stops
# all of them.
#
# Each process gets JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=D
# (any other XLA_FLAGS are kept) and JAX_ENABLE_COMPILATION_CACHE=false: JAX writes the
# persistent compilation cache from process 0 only and its entry does not serve the other
# processes, so process 0 would start each step far ahead and the others' CPU collectives
# (gloo) would time out waiting for it; without the cache all compile, in step.
#
# Example (2 processes x 4 devices, the embedded dataset, which must be built first when
# there are several processes):
#   python -m data_pipelines.build --dataset synthetic_shift --data_dir data
#   launch/local_processes.sh 2 -- --config configs/synthetic.py --workdir runs/synthetic_2p
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "error: launch/local_processes.sh: $*" >&2; exit 2; }

# One shell word, quoted only where needed, so that a printed command can be pasted back.
quote() {
  case $1 in
    '') printf "''" ;;
    *[!A-Za-z0-9_@%+=:,./-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}
quote_all() {
  local out="" word
  for word in "$@"; do out="$out${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}

COUNT=""
DEVICES=4
PORT=""
LOG_DIR=""
DRY_RUN=0
MAIN_ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --) shift; MAIN_ARGS=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --devices_per_process | --port | --log_dir)
      [ $# -ge 2 ] || die "$1 needs a value"
      case $1 in
        --devices_per_process) DEVICES=$2 ;;
        --port) PORT=$2 ;;
        --log_dir) LOG_DIR=$2 ;;
      esac
      shift ;;
    -*) die "unknown option $1 (main's arguments go after --; see launch/local_processes.sh --help)" ;;
    *)
      [ -z "$COUNT" ] || die "unexpected argument $1 (main's arguments go after --)"
      COUNT=$1 ;;
  esac
  shift
done

positive() { case $1 in '' | *[!0-9]* | 0*) return 1 ;; esac; }
[ -n "$COUNT" ] || die "the number of processes is missing: launch/local_processes.sh N -- --config configs/X.py --workdir DIR"
positive "$COUNT" || die "the number of processes $COUNT: expected a positive integer"
positive "$DEVICES" || die "--devices_per_process $DEVICES: expected a positive integer"
[ -z "$PORT" ] || positive "$PORT" || die "--port $PORT: expected a port number"
[ ${#MAIN_ARGS[@]} -gt 0 ] || die "no arguments for main: add -- --config configs/X.py --workdir DIR"
for arg in "${MAIN_ARGS[@]}"; do
  case $arg in
    --coordinator_address* | --num_processes* | --process_id*)
      die "${arg%%=*} among main's arguments: this script sets it for each process" ;;
  esac
done

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
if [ -z "$PORT" ]; then
  PORT=$("$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("localhost", 0))
print(s.getsockname()[1])') || die "$PYTHON could not find a free port: pass --port"
fi
if [ -z "$LOG_DIR" ]; then
  if [ "$DRY_RUN" = 1 ]; then
    LOG_DIR="${TMPDIR:-/tmp}/pgpc_jax_processes.XXXXXX"
  else
    LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pgpc_jax_processes.XXXXXX")
  fi
elif [ "$DRY_RUN" = 0 ]; then
  mkdir -p "$LOG_DIR"
fi

# Keep the user's XLA_FLAGS but this device count (the last of several would be ambiguous).
XLA=""
for flag in ${XLA_FLAGS:-}; do
  case $flag in --xla_force_host_platform_device_count=*) ;; *) XLA="$XLA$flag " ;; esac
done
XLA="$XLA--xla_force_host_platform_device_count=$DEVICES"

command_of() {  # the argv of process $1
  COMMAND=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$XLA" JAX_ENABLE_COMPILATION_CACHE=false
    "PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    "$PYTHON" -m pgpc_jax.main "${MAIN_ARGS[@]}"
    --coordinator_address "localhost:$PORT" --num_processes "$COUNT" --process_id "$1")
}

if [ "$DRY_RUN" = 1 ]; then
  for ((i = 0; i < COUNT; i++)); do
    command_of "$i"
    if [ "$i" = 0 ]; then where="this script's stdout and stderr"; else where="$LOG_DIR/process_$i.log"; fi
    echo "+ $(quote_all "${COMMAND[@]}")  # output: $where"
  done
  exit 0
fi

PIDS=()
stop_all() {
  local pid
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all' EXIT
trap 'stop_all; echo "interrupted: stopped the $COUNT processes" >&2; trap - EXIT; exit 130' INT TERM

case $COUNT in
  1) OTHERS="" ;;
  2) OTHERS=", process 1 writes to $LOG_DIR/process_1.log" ;;
  *) OTHERS=", processes 1..$((COUNT - 1)) write to $LOG_DIR/process_<i>.log" ;;
esac
echo "$COUNT processes x $DEVICES CPU devices, coordinator localhost:$PORT; process 0's output follows$OTHERS" >&2
for ((i = 0; i < COUNT; i++)); do
  command_of "$i"
  if [ "$i" = 0 ]; then
    "${COMMAND[@]}" &
  else
    "${COMMAND[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  fi
  PIDS+=($!)
done

# Wait for all; on the first failure stop the rest (they would wait for it until a timeout).
# A poll rather than `wait -n`: the bash of macOS (3.2) has no `wait -n`.
FAILED=""
STATUS=0
left=$COUNT
while [ "$left" -gt 0 ]; do
  for ((i = 0; i < COUNT; i++)); do
    pid=${PIDS[$i]}
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      rc=0
      wait "$pid" || rc=$?
      PIDS[$i]=""
      left=$((left - 1))
      if [ "$rc" != 0 ] && [ -z "$FAILED" ]; then
        FAILED=$i
        STATUS=$rc
        stop_all
      fi
    fi
  done
  [ "$left" = 0 ] || sleep 0.2
done
trap - EXIT INT TERM

if [ -n "$FAILED" ]; then
  if [ "$FAILED" = 0 ]; then where="above"; else where="in $LOG_DIR/process_$FAILED.log"; fi
  echo "error: process $FAILED of $COUNT exited with status $STATUS (its output is $where); the others were stopped" >&2
  exit "$STATUS"
fi
if [ "$COUNT" = 1 ]; then echo "the process finished" >&2; else echo "all $COUNT processes finished; the others' logs are in $LOG_DIR" >&2; fi
