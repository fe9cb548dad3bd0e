#!/usr/bin/env bash
# The pipeline and planner benchmarks on a quiet many-core machine (gloo on CPU, one thread per rank), in one go:
#   bash benchmarks/quiet_box.sh [OUT_DIR]
# Each part has its own time limit and writes its table to OUT_DIR as it finishes, so a part that runs out of time
# loses only itself. Used on the lent GPU machine's 16 CPU cores (its GPU unused) to see these benchmarks without
# the 2-core development machine's contention; README "Pipeline" and docs/planner.md report the results.
set -u
OUT=${1:-${OUT:-/tmp/quiet_box}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
{ nproc; uptime; python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"; } > "$OUT/env.txt" 2>&1
part() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2> "/tmp/$name.err"
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0)) s, load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/env.txt"
  [ $rc -eq 0 ] || tail -n 30 "/tmp/$name.err" >> "$OUT/$name.txt"
}
part bubble 150 python3 benchmarks/bench_pipeline.py --only link,bubble --model equal --width 1536 --batch 64 --steps 6 \
  --partition balanced --schedules gpipe,1f1b,interleaved_1f1b,zbv_zero_bubble --overlap both
part overhead 130 python3 benchmarks/bench_pipeline.py --only link,overhead --width 64 --batch 64 --steps 8 --repeats 5
part mainjob 70 python3 benchmarks/bench_pipeline.py --only mainjob --steps 8 --repeats 3
part planner 200 python3 benchmarks/bench_planner.py --grid full --top 5 --rounds 2 --steps 3 \
  --only "cnn16 b32 w2,cnn64 b32 w2,resnet8 b128 w2,cnn16 b32 w4,cnn64 b128 w4" --cache-dir /tmp/planner_cache \
  --out "$OUT/planner.json"
