#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every worker (host) of the slice runs the same
# `python -m pgpc_jax.main` command; JAX finds the other workers from the TPU environment.
#
# Needs: gcloud (logged in, a project with TPU quota in the zone), bash, tar and git here;
# a Cloud Storage bucket for the workdir and the datasets (a pod's workers share no disk, so
# both must be gs:// paths; the TPU VM's service account needs write access to the bucket).
#
# Usage:
#   launch/tpu_pod.sh [options] -- --config configs/X.py --workdir gs://BUCKET/runs/X [--config.k=v ...]
# Everything after `--` goes to `python -m pgpc_jax.main` on every worker. Options (each also
# read from the environment variable shown, flag first):
#   --name NAME            TPU VM name ($PGPC_TPU_NAME, default pgpc-jax)
#   --zone ZONE            ($PGPC_TPU_ZONE, default us-central2-b, where v4 slices are)
#   --accelerator-type T   slice type ($PGPC_TPU_TYPE, default v4-32: 4 workers x 4 chips)
#   --version V            TPU VM runtime ($PGPC_TPU_VERSION, default tpu-ubuntu2204-base)
#   --project P            ($PGPC_PROJECT, default: gcloud's configured project)
#   --spot                 create the slice as a Spot VM (cheaper, may be preempted; re-run
#                          this script to resume from the last checkpoint)
#   --install local|git    how the code reaches the workers ($PGPC_INSTALL, default local):
#                          local: a tarball of this checkout (tracked and untracked files that
#                          git does not ignore, so uncommitted edits go too), copied with
#                          `gcloud ... scp`; git: `git clone` of --repo at --ref on each worker
#   --repo URL             git: the repository ($PGPC_REPO, default this checkout's origin)
#   --ref REF              git: the commit, branch or tag ($PGPC_REF, default this checkout's
#                          HEAD commit, which must be pushed)
#   --python PY            the workers' Python 3.11 ($PGPC_REMOTE_PYTHON, default python3.11,
#                          installed with apt-get when absent); the packages of requirements.txt
#                          with jax[tpu] and gcsfs (gs:// paths) go into the venv ~/pgpc_jax_venv
#   --data_dir gs://...    where the datasets are ($PGPC_DATA_DIR); also passed to main as
#                          --config.data.data_dir. Without it the config's data_dir is used and
#                          nothing is built
#   --build "ARGS"         `python -m data_pipelines.build ARGS --data_dir DATA_DIR`, run once on
#                          worker 0 before training; repeat for several datasets (default
#                          "--dataset synthetic_shift"; a real dataset needs its --manual_dir on
#                          worker 0). A finished build is found and reused, not rebuilt
#   --skip_build           the datasets are already in --data_dir: build nothing
#   --logs                 only stream worker 0's log of the run going on (after Ctrl-C)
#   --stop                 stop the run going on, on every worker
#   --dry-run              print every command (lines starting with "+ ") and run none
#
# What it does: (1) creates the TPU VM slice, or reuses it if it exists; (2) on every worker
# (--worker=all) refuses if a run is still going, then installs the code into ~/pgpc_jax and
# the packages; (3) builds the datasets on worker 0; (4) starts the training command on every
# worker in the background, detached from the ssh session, each writing ~/pgpc_jax_run.log;
# (5) streams worker 0's log (process 0 prints the progress and the evaluations) until the run
# ends, and exits with process 0's exit status. Ctrl-C stops only the streaming: the run goes
# on; `--logs` streams it again, `--stop` ends it. Another worker's log:
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=3 --command 'tail ~/pgpc_jax_run.log'
# Re-running the same command resumes the run from the workdir's last checkpoint. The slice
# is not deleted at the end: gcloud compute tpus tpu-vm delete NAME --zone ZONE
#
# Example (the embedded dataset, built on worker 0, then PGPC on a v4-32):
#   launch/tpu_pod.sh --data_dir gs://my-bucket/tfds -- \
#       --config configs/synthetic.py --workdir gs://my-bucket/runs/synthetic
# GTA5 -> Cityscapes, datasets built beforehand and copied to the bucket, code from git:
#   launch/tpu_pod.sh --install git --data_dir gs://my-bucket/tfds --skip_build -- \
#       --config configs/gta2cs.py --workdir gs://my-bucket/runs/gta2cs \
#       --config.init_from.path=gs://my-bucket/pretrained/mit_b5.pth
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "error: launch/tpu_pod.sh: $*" >&2; exit 2; }

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
# Run a command, or with --dry-run print it.
run() {
  if [ "$DRY_RUN" = 1 ]; then echo "+ $(quote_all "$@")"; else "$@"; fi
}

NAME="${PGPC_TPU_NAME:-pgpc-jax}"
ZONE="${PGPC_TPU_ZONE:-us-central2-b}"
TYPE="${PGPC_TPU_TYPE:-v4-32}"
VERSION="${PGPC_TPU_VERSION:-tpu-ubuntu2204-base}"
PROJECT="${PGPC_PROJECT:-}"
INSTALL="${PGPC_INSTALL:-local}"
REPO="${PGPC_REPO:-}"
REF="${PGPC_REF:-}"
REMOTE_PYTHON="${PGPC_REMOTE_PYTHON:-python3.11}"
DATA_DIR="${PGPC_DATA_DIR:-}"
SPOT=0
SKIP_BUILD=0
ACTION=launch
DRY_RUN=0
BUILDS=()
MAIN_ARGS=()

while [ $# -gt 0 ]; do
  case $1 in
    --) shift; MAIN_ARGS=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --skip_build) SKIP_BUILD=1 ;;
    --logs) ACTION=logs ;;
    --stop) ACTION=stop ;;
    --name | --zone | --accelerator-type | --version | --project | --install | --repo | --ref \
      | --python | --data_dir | --build)
      [ $# -ge 2 ] || die "$1 needs a value"
      case $1 in
        --name) NAME=$2 ;;
        --zone) ZONE=$2 ;;
        --accelerator-type) TYPE=$2 ;;
        --version) VERSION=$2 ;;
        --project) PROJECT=$2 ;;
        --install) INSTALL=$2 ;;
        --repo) REPO=$2 ;;
        --ref) REF=$2 ;;
        --python) REMOTE_PYTHON=$2 ;;
        --data_dir) DATA_DIR=$2 ;;
        --build) BUILDS+=("$2") ;;
      esac
      shift ;;
    --*=*) die "${1%%=*}: give the value after a space (${1%%=*} VALUE)" ;;
    *) die "unknown option $1 (main's arguments go after --; see launch/tpu_pod.sh --help)" ;;
  esac
  shift
done

GCLOUD=(gcloud)
[ -n "$PROJECT" ] && GCLOUD+=(--project "$PROJECT")
TPU=("${GCLOUD[@]}" compute tpus tpu-vm)
# Paths on the workers (relative to the home folder the ssh commands start in).
CODE=pgpc_jax
VENV=pgpc_jax_venv
LOG=pgpc_jax_run.log
PIDFILE=pgpc_jax_run.pid
RCFILE=pgpc_jax_run.rc

ssh_workers() {  # ssh_workers WORKER COMMAND
  run "${TPU[@]}" ssh "$NAME" --zone "$ZONE" --worker="$1" --command "$2"
}

# Stream worker 0's log until its run ends; exit with process 0's status.
stream_log() {
  [ "$DRY_RUN" = 1 ] || echo "worker 0's log of the run on $NAME follows (Ctrl-C stops the streaming, not the run: launch/tpu_pod.sh --logs streams it again, --stop ends it)" >&2
  ssh_workers 0 "for i in \$(seq 60); do [ -s $PIDFILE ] && break; sleep 1; done; \
pid=\$(cat $PIDFILE 2>/dev/null) || { echo 'error: no run was started on worker 0' >&2; exit 2; }; \
tail -n +1 -F --pid=\"\$pid\" $LOG 2>/dev/null; \
rc=\$(cat $RCFILE 2>/dev/null) || { echo 'the run was stopped' >&2; exit 1; }; \
echo \"the run ended with exit status \$rc\" >&2; exit \"\$rc\""
}

if [ "$ACTION" = logs ]; then
  stream_log
  exit 0
fi
if [ "$ACTION" = stop ]; then
  # The run is its own process group (setsid): kill the group, training and all.
  ssh_workers all "pid=\$(cat $PIDFILE 2>/dev/null) && kill -- -\"\$pid\" 2>/dev/null \
&& echo \"stopped \$pid on \$(hostname)\" || echo \"no run going on \$(hostname)\""
  exit 0
fi

# --- Checks, before anything is created or copied --------------------------------------------
[ ${#MAIN_ARGS[@]} -gt 0 ] || die "no arguments for main: add -- --config configs/X.py --workdir gs://BUCKET/runs/X"
WORKDIR=""
HAS_DATA_DIR_OVERRIDE=0
i=0
while [ $i -lt ${#MAIN_ARGS[@]} ]; do
  arg=${MAIN_ARGS[$i]}
  case $arg in
    --workdir | -workdir) WORKDIR=${MAIN_ARGS[$((i + 1))]:-} ;;
    --workdir=* | -workdir=*) WORKDIR=${arg#*=} ;;
    --config.data.data_dir* | -config.data.data_dir*) HAS_DATA_DIR_OVERRIDE=1 ;;
  esac
  i=$((i + 1))
done
[ -n "$WORKDIR" ] || die "no --workdir among main's arguments: add --workdir gs://BUCKET/runs/X after --"
case $WORKDIR in
  gs://?*) ;;
  *) die "--workdir $WORKDIR is not a gs:// path: a pod's workers share no local disk, so the workdir must be a Cloud Storage path, e.g. gs://BUCKET/runs/X" ;;
esac
if [ -n "$DATA_DIR" ]; then
  case $DATA_DIR in
    gs://?*) ;;
    *) die "--data_dir $DATA_DIR is not a gs:// path: every worker reads the datasets, so they must be in Cloud Storage, e.g. gs://BUCKET/tfds" ;;
  esac
  [ "$HAS_DATA_DIR_OVERRIDE" = 0 ] || die "both --data_dir and --config.data.data_dir given: keep one"
  MAIN_ARGS+=("--config.data.data_dir=$DATA_DIR")
fi
case $INSTALL in
  local) ;;
  git)
    if [ -z "$REPO" ]; then
      REPO=$(git -C "$ROOT" remote get-url origin 2>/dev/null) \
        || die "--install git without --repo, and this checkout has no origin remote: pass --repo URL, or use --install local"
    fi
    if [ -z "$REF" ]; then
      REF=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null) || die "--install git without --ref, and $ROOT is not a git checkout: pass --ref"
    fi ;;
  *) die "--install $INSTALL: expected local or git" ;;
esac
[ ${#BUILDS[@]} -gt 0 ] || BUILDS=("--dataset synthetic_shift")

# --- 1. The slice: reuse it if it exists ----------------------------------------------------
CREATE=("${TPU[@]}" create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION")
[ "$SPOT" = 1 ] && CREATE+=(--spot)
if [ "$DRY_RUN" = 1 ]; then
  echo "# the slice is created only if describe finds none"
  run "${TPU[@]}" describe "$NAME" --zone "$ZONE" --format 'value(state)'
  run "${CREATE[@]}"
elif state=$("${TPU[@]}" describe "$NAME" --zone "$ZONE" --format 'value(state)' 2>/dev/null); then
  echo "reusing the TPU VM $NAME in $ZONE (state $state)" >&2
  [ "$state" = READY ] || echo "warning: $NAME is $state, not READY; start it with: gcloud compute tpus tpu-vm start $NAME --zone $ZONE" >&2
else
  run "${CREATE[@]}"
fi

# --- 2. The code and the packages on every worker --------------------------------------------
# A run still going would hold the TPU chips: refuse rather than start a second one.
NOT_RUNNING="if [ -s $PIDFILE ] && kill -0 \"\$(cat $PIDFILE)\" 2>/dev/null; then \
echo \"error: a run is still going on \$(hostname) (pid \$(cat $PIDFILE)): stream it with launch/tpu_pod.sh --logs, or end it with launch/tpu_pod.sh --stop\" >&2; exit 3; fi"
SETUP="command -v $REMOTE_PYTHON >/dev/null && $REMOTE_PYTHON -c 'import ensurepip' 2>/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $REMOTE_PYTHON $REMOTE_PYTHON-venv; }; \
[ -x $VENV/bin/python ] || $REMOTE_PYTHON -m venv $VENV; \
$VENV/bin/pip install -q --disable-pip-version-check -r $CODE/requirements.txt 'jax[tpu]==0.10.2' 'gcsfs>=2024.2'"
if [ "$INSTALL" = local ]; then
  TARBALL="${TMPDIR:-/tmp}/pgpc_jax_code.tar.gz"
  # The files git tracks or would track (not .venv, runs/, data/ or caches).
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ git -C $(quote "$ROOT") ls-files -z --cached --others --exclude-standard | tar -czf $(quote "$TARBALL") -C $(quote "$ROOT") --null -T -"
  else
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
      | tar -czf "$TARBALL" -C "$ROOT" --null -T -
  fi
  run "${TPU[@]}" scp "$TARBALL" "$NAME:pgpc_jax_code.tar.gz" --zone "$ZONE" --worker=all
  ssh_workers all "set -e; $NOT_RUNNING; rm -rf $CODE && mkdir $CODE && tar -xzf pgpc_jax_code.tar.gz -C $CODE; $SETUP"
else
  ssh_workers all "set -e; $NOT_RUNNING; command -v git >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq git; }; \
rm -rf $CODE && git clone --quiet $(quote "$REPO") $CODE && git -C $CODE checkout --quiet $(quote "$REF"); $SETUP"
fi

# --- 3. The datasets, once, on worker 0 ------------------------------------------------------
if [ -n "$DATA_DIR" ] && [ "$SKIP_BUILD" = 0 ]; then
  for build in "${BUILDS[@]}"; do
    read -r -a build_args <<<"$build"
    ssh_workers 0 "cd $CODE && ../$VENV/bin/python -m data_pipelines.build $(quote_all "${build_args[@]}") --data_dir $(quote "$DATA_DIR")"
  done
fi

# --- 4. The same training command on every worker, detached ---------------------------------
# setsid + nohup: the run outlives this ssh session (a closed laptop does not stop it), and is
# one process group that --stop can end. The inner shell records its pid and, at the end, the
# exit status, which the streaming below waits for.
TRAIN="cd $CODE && PYTHONUNBUFFERED=1 exec ../$VENV/bin/python -m pgpc_jax.main $(quote_all "${MAIN_ARGS[@]}")"
INNER="echo \$\$ > $PIDFILE; ($TRAIN) > $LOG 2>&1; echo \$? > $RCFILE"
ssh_workers all "$NOT_RUNNING; rm -f $PIDFILE $RCFILE $LOG; \
nohup setsid bash -c $(quote "$INNER") > /dev/null 2>&1 < /dev/null &"

# --- 5. Process 0's log ----------------------------------------------------------------------
stream_log
