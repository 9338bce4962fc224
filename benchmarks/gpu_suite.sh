#!/usr/bin/env bash
# The GPU suite: one command, from a clean copy of the repo on a machine with jax[cuda] and torch,
# that measures what the performance tables need and writes them under $OUT:
#
#   OUT=/tmp/suite bash benchmarks/gpu_suite.sh          # the real shapes (GTA->CS configs)
#   OUT=/tmp/suite bash benchmarks/gpu_suite.sh --tiny   # the same parts at a CPU test size
#
# 1. grain, ml-collections and tensorflow-datasets, if missing, from local wheels in .whl/
#    (`../shared/device/wheels.sh` downloads them on a machine with a network);
# 2. source-only step, ours against the PyTorch reference (fp32 and bf16 autocast), interleaved;
# 3. the step of every method config (source-only, DAFormer, PGPC, SePiCo, FDA) in fp32 and bf16;
# 4. the compiled PGPC step's memory (XLA's analysis) with model.remat none / blocks / all;
# 5. 200 steps of gta2cs (PGPC, bf16) on random data;
# 6. the input pipeline at this host's full worker count (PNG frames at GTA's size).
#
# Each part has its own time limit (the whole suite fits 8 minutes on one H100/H200 with a warm
# compile cache, ~10 cold); a part that fails or times out is reported and the others still
# run. Writes $OUT/<part>.json (step_time.py --json), $OUT/<part>.log and $OUT/gpu_suite.md (all
# tables), and exits non-zero if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_suite}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TINY=0
if [ "${1:-}" = "--tiny" ]; then TINY=1; fi

if ! "$PY" -c "import grain, ml_collections, tensorflow_datasets" 2>/dev/null; then
  if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  else
    echo "gpu_suite: grain / ml-collections / tensorflow-datasets are missing and .whl/ holds no" \
      "wheels: run ../shared/device/wheels.sh (or pip install -r requirements.txt) first" >&2
    exit 2
  fi
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/xla_cache}

if [ $TINY = 1 ]; then
  BASE=configs/synthetic.py
  SETS=(--set "model.backbone='tiny'" --set "data.source.crop_size=(64, 64)"
        --set "data.target.crop_size=(64, 64)")
  STEPS=2; LONG=3; LIMIT=300; PIPE=(--images 2 --batches 2 --workers 0)
else
  BASE=configs/gta2cs.py
  SETS=()
  STEPS=10; LONG=200; LIMIT=240; PIPE=(--images 16 --batches 40 --workers "0,$(nproc)")
fi
BF16=(--set "model.dtype='bfloat16'")

failed=()
part() {  # part NAME SECONDS COMMAND...: run, log, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name" | tee -a "$OUT/gpu_suite.md"
  local start=$SECONDS
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "($((SECONDS - start)) s)" >> "$OUT/gpu_suite.md"
    grep -E '^(\||device|[0-9]+ round)' "$OUT/$name.log" >> "$OUT/gpu_suite.md"
  else
    echo "FAILED or timed out after ${limit}s: $*" | tee -a "$OUT/gpu_suite.md"
    tail -5 "$OUT/$name.log" >> "$OUT/gpu_suite.md"
    failed+=("$name")
  fi
  echo >> "$OUT/gpu_suite.md"
}

: > "$OUT/gpu_suite.md"
ST=benchmarks/step_time.py
part torch_side_by_side "$LIMIT" "$PY" $ST --config $BASE:source_only --torch fp32,bf16 \
  --rounds 2 --steps $STEPS --warmup 3 "${SETS[@]}" --json "$OUT/torch_side_by_side.json"
METHODS=(--config $BASE:source_only --config $BASE:daformer --config $BASE --config $BASE:sepico
         --config $BASE:fda)
REMATS=(none blocks all)
if [ $TINY = 1 ]; then  # the CPU check of the script: each part once, few distinct compiles
  METHODS=(--config $BASE:source_only)
  REMATS=(none all)
  TRAIN=$BASE:source_only
else
  TRAIN=$BASE
fi
part methods_fp32 "$LIMIT" "$PY" $ST "${METHODS[@]}" --steps $STEPS --warmup 3 "${SETS[@]}" \
  --json "$OUT/methods_fp32.json"
part methods_bf16 "$LIMIT" "$PY" $ST "${METHODS[@]}" --steps $STEPS --warmup 3 "${SETS[@]}" \
  "${BF16[@]}" --json "$OUT/methods_bf16.json"
for remat in "${REMATS[@]}"; do
  part "memory_$remat" "$LIMIT" "$PY" $ST --memory --config $TRAIN "${SETS[@]}" "${BF16[@]}" \
    --set "model.remat='$remat'" --json "$OUT/memory_$remat.json"
done
part train_${LONG}_steps "$LIMIT" "$PY" $ST --config $TRAIN --steps $LONG --warmup 3 "${SETS[@]}" \
  "${BF16[@]}" --json "$OUT/train_${LONG}_steps.json"
part input_pipeline "$LIMIT" "$PY" benchmarks/input_pipeline.py --work_dir "$OUT/pipeline" "${PIPE[@]}"

"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
parts = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(f"{out}/*.json"))
         if not p.endswith("gpu_suite.json")}
json.dump(parts, open(f"{out}/gpu_suite.json", "w"), indent=1)
print(f"gpu_suite: {len(parts)} measured parts in {out}/gpu_suite.json and {out}/gpu_suite.md")
EOF
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_suite: failed parts: ${failed[*]} (see $OUT/<part>.log)" >&2
  exit 1
fi
