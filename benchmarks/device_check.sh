#!/usr/bin/env bash
# One command that proves extkd_jax on an accelerator (or, with --cpu, rehearses the same sequence on a CPU).
#
#   bash benchmarks/device_check.sh [--cpu] [--wheelhouse DIR] [--data DIR] [--out DIR] [--budget SECONDS]
#
# Phases, each under its own time limit inside --budget (default 560 s; --cpu 540 s), none stopping the others:
#   0. install the project from the wheelhouse (benchmarks/make_wheelhouse.sh) into a private site dir, if given;
#   1. the tests that mean something on an accelerator (`pytest -m accelerator`: whole-epoch scan = per-step
#      dispatch, bf16 losses, BN folding, backend check) on the accelerator;
#   2. benchmarks/throughput.py: our distill step (bf16, BN-folded teacher) against torch eager fp32, eager AMP and
#      torch.compile AMP at batch 256 and 1024, with a profile summary and a teacher/student breakdown;
#   3. `extkd reproduce --config=cifar10_drop:short` on real CIFAR-10 in --data (--cpu: a synthetic set at toy
#      sizes), from outside the repository: epoch times and accuracies;
#   4. the f32 / unfolded-teacher baseline step, if time is left.
# Writes at most 8 files under --out ($OUT by default) and prints one JSON line of headline figures last.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
mode=device wheelhouse="" data="" out=${OUT:-} budget=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --wheelhouse) wheelhouse=$2; shift ;;
    --wheelhouse=*) wheelhouse=${1#*=} ;;
    --data) data=$2; shift ;;
    --data=*) data=${1#*=} ;;
    --out) out=$2; shift ;;
    --out=*) out=${1#*=} ;;
    --budget) budget=$2; shift ;;
    --budget=*) budget=${1#*=} ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# the CPU rehearsal shares 2 cores with whatever else runs (CI runs it beside other tests): longer limits
if [ "$mode" = cpu ]; then budget=${budget:-540}; scale=2; else budget=${budget:-560}; scale=1; data=${data:-/root/data}; fi
out=${out:-$(mktemp -d /tmp/extkd_device_check.XXXX)}
work=$(mktemp -d /tmp/extkd_dc_work.XXXX)
mkdir -p "$out"
log="$out/device_check.log"
start=$(date +%s)
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR="$work/xla"
py=$(command -v python3 || command -v python)

say() { echo "[device_check $(( $(date +%s) - start ))s] $*" | tee -a "$log"; }
left() { echo $(( budget - ($(date +%s) - start) )); }
# phase NAME SECONDS CMD...: runs CMD under min(SECONDS, time left - 10 s), logs it, records status and time
declare -A status seconds
phase() {
  local name=$1 limit=$2; shift 2
  local avail=$(( $(left) - 10 )); [ "$avail" -lt "$limit" ] && limit=$avail
  if [ "$limit" -lt 20 ]; then status[$name]="skipped: out of time"; say "$name: skipped (out of time)"; return; fi
  say "$name: start (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  seconds[$name]=$(( $(date +%s) - t0 ))
  case $rc in 0) status[$name]=ok ;; 124|137) status[$name]="timed out after ${limit}s" ;; *) status[$name]="failed (exit $rc)" ;; esac
  say "$name: ${status[$name]} in ${seconds[$name]}s"
}

say "mode=$mode out=$out data=${data:-synthetic} budget=${budget}s repo=$repo"
{ uname -a; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; nproc; } >>"$log" 2>&1

# 0. install from the wheelhouse (the device image has jax, flax, optax, orbax, chex, torch; not ml_collections)
if [ -n "$wheelhouse" ]; then
  phase install 120 "$py" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" "$wheelhouse"/*.whl
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$work/site/bin:$PATH"
fi
(cd /tmp && extkd --version) >>"$log" 2>&1 || say "extkd is not installed: run make_wheelhouse.sh and pass --wheelhouse"

if [ "$mode" = cpu ]; then
  platform=cpu
  bench=(--quick --configs bf16_fold --forms scan,dispatch --batch-sizes 8 --torch-modes eager_fp32)
  extra=(--quick --configs f32_nofold --forms scan --batch-sizes 8 --torch-modes "")
  data="$work/synthetic_cifar"
  "$py" "$repo/benchmarks/synthetic_cifar.py" "$data" --train 1200 --test 300 >>"$log" 2>&1
  sizes=(--config=cifar10_drop:cpu --config.data.max_train_examples=0 --config.data.val_size=200
         --config.batch_size=50 --config.teacher.num_epochs=2 --config.num_epochs=1 --config.eval_batch_size=300
         --config.optim.warmup_epochs=0
         "--config.reproduce.methods=('kd','extended_kd')" "--config.reproduce.grid.kd=(4.0,)"
         "--config.reproduce.grid.extended_kd=(1.0,)")
else
  platform=cuda
  bench=(--configs bf16_fold --forms scan --batch-sizes 256,1024 --steps 30 --reps 3
         --torch-modes compile_amp_bf16,eager_amp_bf16_channels_last,eager_fp32)
  extra=(--configs f32_nofold --forms scan --batch-sizes 256,1024 --steps 30 --reps 3 --torch-modes "")
  sizes=(--config=cifar10_drop:short)
fi

# 1. the accelerator tests, on the accelerator (conftest defaults JAX_PLATFORMS to cpu; name the platform)
# (several pytest workers share the GPU: each allocates as it goes instead of taking 75% of the memory up front;
# run one after another, the compiles of ~50 small programs took over 90 s on an H100, with 6 workers 20 s)
workers=$(( $(nproc) < 6 ? $(nproc) : 6 ))
phase tests $((90 * scale)) env JAX_PLATFORMS=$platform EXTKD_EXPECT_BACKEND=${platform/cuda/gpu} XLA_PYTHON_CLIENT_PREALLOCATE=false \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" \
  "$py" -m pytest -q -m accelerator -p no:cacheprovider -o addopts="" -n "$workers" "$repo/tests" \
  --junitxml="$work/tests.xml"
cp "$work/tests.xml" "$out/tests.xml" 2>/dev/null

# 2. throughput against PyTorch, profile summary and breakdown (JAX keeps 45% of the GPU, torch gets the rest)
phase throughput $((110 * scale + 110)) env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 \
  "$py" "$repo/benchmarks/throughput.py" "${bench[@]}" --profile "$work/profile" --breakdown --out "$out/throughput.json"

# 3. the experiment at reduced size, run from outside the repository with the installed command
if [ -d "$data" ]; then
  phase cifar10 260 bash -c 'cd /tmp && exec extkd reproduce "$@"' _ "${sizes[@]}" --config.data.dir="$data" \
    --config.progress=False --workdir="$work/cifar10"
  cp "$work/cifar10/results.json" "$out/cifar10_results.json" 2>/dev/null
  cp "$work/cifar10/report.md" "$out/cifar10_report.md" 2>/dev/null
  [ -f "$work/cifar10/results.json" ] || cp "$work/cifar10/teacher/metrics.jsonl" "$out/cifar10_teacher_metrics.jsonl" 2>/dev/null
else
  status[cifar10]="skipped: no data folder $data (see benchmarks/README.md: moving CIFAR-10 to the device)"
  say "cifar10: ${status[cifar10]}"
fi

# 4. the plain baseline (float32, teacher BN not folded), only with the time that is left
phase baseline 120 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 \
  "$py" "$repo/benchmarks/throughput.py" "${extra[@]}" --out "$out/throughput_baseline.json"

# the headline: one JSON line
statuses=""; for k in "${!status[@]}"; do statuses+="$k=${status[$k]};"; done
STATUSES="$statuses" WALL=$(( $(date +%s) - start )) MODE=$mode "$py" "$repo/benchmarks/device_check_summary.py" \
  "$out" | tee "$out/summary.json"
rm -rf "$work"
case "${status[tests]:-}${status[throughput]:-}" in okok) exit 0 ;; *) exit 1 ;; esac
