#!/usr/bin/env bash
# Prepares the wheelhouse that benchmarks/device_check.sh installs from on a machine with no internet: the
# project's own wheel plus exactly the packages the lent GPU image lacks (ml-collections; tensorflow-datasets and
# grain are imported lazily and not needed there). Run here, where pip reaches PyPI:
#     bash benchmarks/make_wheelhouse.sh [DIR]          # default .wheelhouse/ (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.wheelhouse}
rm -rf "$out"
mkdir -p "$out"
python -m pip wheel --quiet --no-deps --wheel-dir "$out" .
# the version installed here, so the device runs what the tests ran; pure Python, any platform
mlc=$(python -c "import importlib.metadata as m; print(m.version('ml_collections'))")
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --dest "$out" "ml-collections==$mlc"
ls -l "$out"
size=$(du -sm "$out" | cut -f1)
echo "wheelhouse: $out, ${size} MiB"
if [ "$size" -gt 40 ]; then echo "wheelhouse over 40 MiB: the device call carries at most 64 MiB" >&2; exit 1; fi
