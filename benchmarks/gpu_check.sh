#!/usr/bin/env bash
# One prepared GPU check (NCCL path, full-width case study), for a machine with one CUDA GPU.
# Needs hydra-core/omegaconf wheels in .whl/ where they are not installed (see README: GPU check).
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}
RUNS=/tmp/gpu_runs
mkdir -p "$OUT" "$RUNS"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'nccl', torch.cuda.nccl.version())" | tee -a "$OUT/gpu.txt"
run() {  # name, overrides...
  local name=$1; shift
  timeout 240 python3 -m lightning_distnn.train trainer=gpu trainer.devices=1 trainer.enable_progress_bar=false \
    hydra.run.dir="$RUNS/$name" "$@" > "$RUNS/$name.log" 2>&1
  local rc=$?
  { echo "=== $name (rc=$rc)"; tail -n 40 "$RUNS/$name.log"; } >> "$OUT/logs.txt"
  echo "$name rc=$rc $(python3 -c "import json,sys; m=json.load(open('$RUNS/$name/metrics.json')); print('test_acc=%.4f images_per_s=%.1f params=%s strategy=%s' % (m.get('test/acc', float('nan')), m['images_per_s'], m['params_per_rank'], m['strategy']))" 2>/dev/null)" | tee -a "$OUT/summary.txt"
}
# the seed's full-width case study (5 conv x 512, 3 FC x 1024) on digits, NCCL: accuracy, ours and Lightning's DDP
run dp_digits model=case_study data=digits trainer.max_epochs=8 data.batch_size=64
run ddp_digits model=case_study data=digits trainer.max_epochs=8 data.batch_size=64 strategy=lightning_ddp
# throughput on synthetic CIFAR-shaped data, batch 256, interleaved x3
for i in 1 2 3; do
  run "dp_synth_$i" model=case_study data=synthetic data.num_samples=16384 data.batch_size=256 trainer.max_epochs=2 run_test=false
  run "ddp_synth_$i" model=case_study data=synthetic data.num_samples=16384 data.batch_size=256 trainer.max_epochs=2 run_test=false strategy=lightning_ddp
done
# the one-process test suite under this machine's torch (multi-process gloo tests are marked slow)
timeout 120 python3 -m pytest -q -m "not slow" -p no:cacheprovider > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?" | tee -a "$OUT/summary.txt"
tail -n 5 "$OUT/pytest.txt"
