#!/usr/bin/env bash
# The CIFAR-10 method comparisons (CPU-scale preset: resnet14 -> resnet8 on a 20k-image subset, 2 seeds, two-value
# grids) in one call to a lent accelerator, every method as its own process (launch/parallel_reproduce.py):
#
#   bash benchmarks/device_comparison.sh [--cpu] [--wheelhouse DIR] [--data DIR] [--out DIR] [--workers N]
#                                        [--deadline SECONDS] [--experiment NAME=PRESET]... [--override FLAG]...
#
# Experiments: zoo_cifar10 = cifar10_drop:cpu,zoo (the KD zoo, issue #15) and methods_cifar10 =
# cifar10_drop:cpu,conv (the related methods that use feature maps, issue #14). --deadline (default 330 s) bounds
# the training jobs; the reports are then written from what finished. Writes at most 8 files under --out:
# parallel.log, parallel_summary.json, <experiment>.tgz (report, results, plots, run configs and metrics; no
# checkpoints) and part_logs.tgz. --cpu rehearses the same sequence on the smoke presets. --experiment (repeatable)
# replaces the default experiments; --override (repeatable) adds a --config.KEY=VALUE flag to every run.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
mode=device wheelhouse="" data=/root/data out=${OUT:-} workers=12 deadline=330 chosen=() extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --wheelhouse) wheelhouse=$2; shift ;;
    --data) data=$2; shift ;;
    --out) out=$2; shift ;;
    --workers) workers=$2; shift ;;
    --deadline) deadline=$2; shift ;;
    --experiment) chosen+=("--experiment=$2"); shift ;;
    --override) extra+=("$2"); shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "device_comparison.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
out=${out:-$(mktemp -d /tmp/extkd_comparison.XXXX)}
work=$(mktemp -d /tmp/extkd_cmp_work.XXXX)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR="$work/xla"
py=$(command -v python3 || command -v python)
start=$(date +%s)
if [ -n "$wheelhouse" ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" "$wheelhouse"/*.whl || exit 1
fi
# the checkout's package first (the code under test), laid out as the wheel lays it out (configs/ inside it:
# setup.cfg's package_dir), the wheelhouse's dependencies after it
mkdir -p "$work/src" && cp -R "$repo/extkd_jax" "$work/src/" && cp -R "$repo/configs" "$work/src/extkd_jax/configs" \
  || exit 1
export PYTHONPATH="$work/src${wheelhouse:+:$work/site}${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; nproc; } \
  >"$out/parallel.log" 2>&1

if [ "$mode" = cpu ]; then
  experiments=(--experiment=zoo_smoke=smoke:zoo --experiment=conv_smoke=smoke:conv)
  overrides=(--config.progress=False)
else
  experiments=(--experiment=zoo_cifar10=cifar10_drop:cpu,zoo --experiment=methods_cifar10=cifar10_drop:cpu,conv)
  overrides=(--config.data.dir="$data" --config.progress=False)
fi
[ ${#chosen[@]} -gt 0 ] && experiments=("${chosen[@]}")
overrides+=("${extra[@]}")
(cd /tmp && "$py" "$repo/launch/parallel_reproduce.py" --workdir="$work/cmp" --workers="$workers" \
  --deadline="$deadline" "${experiments[@]}" -- "${overrides[@]}") >>"$out/parallel.log" 2>&1
rc=$?
echo "[device_comparison] parallel_reproduce exit $rc after $(( $(date +%s) - start ))s" | tee -a "$out/parallel.log"
cp "$work/cmp/parallel_summary.json" "$out/" 2>/dev/null
for dir in "$work"/cmp/*/; do
  name=$(basename "$dir")
  case $name in parts|xla_cache) continue ;; esac
  tar czf "$out/$name.tgz" -C "$work/cmp" --exclude=checkpoints --exclude=tensorboard --exclude=.lock "$name"
done
(cd "$work/cmp/parts" 2>/dev/null && tar czf "$out/part_logs.tgz" */part.log)
grep "^\[parallel\]\|^\[device_comparison\]" "$out/parallel.log"
rm -rf "$work"
exit $rc
