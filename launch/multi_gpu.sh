#!/usr/bin/env bash
# Train on one host with all its GPUs: one process, and JAX uses every local GPU (the global
# batch is split over them, the state is replicated).
#
# Needs: NVIDIA GPUs with their driver (nvidia-smi), Python with this project's requirements
# and the CUDA build of jax at the pinned version, e.g.
#   pip install -r requirements.txt "jax[cuda12]==$(sed -n 's/^jax==//p' requirements.txt)"
# The interpreter is $PYTHON (default `python`, else `python3`). The GPUs used are the ones
# CUDA_VISIBLE_DEVICES leaves visible (all when unset).
#
# Usage:
#   launch/multi_gpu.sh [--dry-run] [--] --config configs/X.py --workdir DIR [--config.k=v ...]
# Every argument but --dry-run goes to `python -m pgpc_jax.main` (a leading `--` is dropped).
# The script checks that nvidia-smi lists GPUs and that JAX sees them, prints their number and
# runs main; its exit status is main's (2: bad input, with one error line). --dry-run prints
# the command (a line starting with "+ ") and runs nothing, the checks included.
# Several GPU hosts: run this script on each with, after --, --coordinator_address
# host0:PORT --num_processes HOSTS --process_id i (or see launch/slurm.sbatch).
#
# Example (GTA5 -> Cityscapes on an 8-GPU host):
#   launch/multi_gpu.sh --config configs/gta2cs.py --workdir runs/gta2cs \
#       --config.init_from.path=pretrained/mit_b5.pth --config.data.data_dir=/data/tfds
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "error: launch/multi_gpu.sh: $*" >&2; exit 2; }

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

DRY_RUN=0
MAIN_ARGS=()
SEPARATOR_SEEN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --)
      if [ "$SEPARATOR_SEEN" = 0 ] && [ ${#MAIN_ARGS[@]} = 0 ]; then SEPARATOR_SEEN=1; else MAIN_ARGS+=("$arg"); fi ;;
    *) MAIN_ARGS+=("$arg") ;;
  esac
done
[ ${#MAIN_ARGS[@]} -gt 0 ] || die "no arguments for main: launch/multi_gpu.sh --config configs/X.py --workdir DIR"

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
COMMAND=("$PYTHON" -m pgpc_jax.main "${MAIN_ARGS[@]}")

if [ "$DRY_RUN" = 1 ]; then
  echo "+ $(quote_all "${COMMAND[@]}")"
  exit 0
fi

command -v nvidia-smi >/dev/null 2>&1 \
  || die "nvidia-smi not found: this script needs NVIDIA GPUs and their driver (for a CPU, run python -m pgpc_jax.main directly)"
GPUS=$(nvidia-smi --list-gpus | grep -c '^GPU' || true)
[ "$GPUS" -gt 0 ] || die "nvidia-smi lists no GPU"
# A CPU-only jaxlib would train on the CPU without a word: stop here instead.
SEEN=$("$PYTHON" -c 'import jax
try:
    print(len(jax.devices("gpu")))
except RuntimeError:
    print(0)' 2>/dev/null) || die "$PYTHON could not import jax: install the requirements (pip install -r requirements.txt)"
[ "$SEEN" -gt 0 ] || die "nvidia-smi lists $GPUS GPUs but JAX sees none: install the CUDA build of jax, pip install \"jax[cuda12]==\$(sed -n 's/^jax==//p' requirements.txt)\""
echo "$GPUS GPUs on $(hostname) (JAX uses $SEEN): $(quote_all "${COMMAND[@]}")" >&2
exec "${COMMAND[@]}"
