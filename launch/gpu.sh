#!/usr/bin/env bash
# One host, all its GPUs: optionally install extkd_jax (with CUDA jax) into a virtualenv or the current Python,
# list the GPUs, and run one extkd command with XLA_PYTHON_CLIENT_MEM_FRACTION set.
set -euo pipefail

PROG=$(basename "$0")
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

DEFAULT_COMMAND='extkd reproduce --config=cifar10_drop'

usage() {
  cat <<EOF
Usage: $PROG [options]

Runs one extkd command on this host with all its GPUs (one process; JAX uses every visible GPU). Set
CUDA_VISIBLE_DEVICES yourself to use fewer. The command runs from the repository root (presets by name or path).

Options:
  --command CMD         extkd command to run, without --workdir or --config.data.dir
                        (default: '$DEFAULT_COMMAND')
  --workdir DIR         run directory, local or gs://bucket/path (default: \$WORKDIR or /tmp/extkd_run; relative
                        to where you are)
  --data DIR            the dataset, passed as --config.data.dir=DIR: an npz folder, local or gs://, made once with
                          extkd data prepare DATASET --out=DIR
                        Without it the run finds the data itself (\$EXTKD_DATA_DIR/DATASET, else tfds, downloading it)
  --venv DIR            use the virtualenv DIR: created with python3 -m venv and installed into when it does not
                        exist yet (--install installs again)
  --install             pip install -e '.[all]' 'jax[EXTRA]' (into --venv if given, else into the current python3)
  --jax-extra EXTRA     the jax extra to install, default cuda12 (e.g. cuda13); 'none' installs jax as-is
  --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION, in (0, 1] (default: \$XLA_PYTHON_CLIENT_MEM_FRACTION
                        or .9)
  --dry-run             print every command, one per line prefixed with '+ ', and run nothing
  -h, --help            show this help

Example:
  $PROG --venv=.venv --workdir=workdirs/cifar10 --dry-run
EOF
}

COMMAND=$DEFAULT_COMMAND
WORKDIR=${WORKDIR:-/tmp/extkd_run}
DATA=""
VENV=""
INSTALL=0
JAX_EXTRA=cuda12
MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.9}
PYTHON=${PYTHON:-python3}

while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --command | --command=*) take_value "$@"; COMMAND=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --workdir | --workdir=*) take_value "$@"; WORKDIR=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --data | --data=*) take_value "$@"; DATA=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --venv | --venv=*) take_value "$@"; VENV=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --jax-extra | --jax-extra=*) take_value "$@"; JAX_EXTRA=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --mem-fraction | --mem-fraction=*) take_value "$@"; MEM_FRACTION=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --install) INSTALL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) unknown_arg "$1" ;;
  esac
done

# ---- validation ----
FRACTION_RE='^(0?\.[0-9]*[1-9][0-9]*|1|1\.0*)$'
[[ $MEM_FRACTION =~ $FRACTION_RE ]] || die "--mem-fraction must be a number in (0, 1], got '$MEM_FRACTION'"
[[ $JAX_EXTRA =~ ^[a-z0-9_]+$ ]] || die "invalid --jax-extra '$JAX_EXTRA' (e.g. cuda12, or none)"
check_command_has_no_workdir "$COMMAND"
case " $COMMAND" in
  *" --config.data.dir"*) die "--command must not contain --config.data.dir; pass the data with --data: $COMMAND" ;;
esac
split_command "$COMMAND"
WORKDIR=$(absolute_path "$WORKDIR")
DATA_FLAG=()
if [ -n "$DATA" ]; then
  DATA_FLAG=(--config.data.dir="$(absolute_path "$DATA")")
elif [ -z "${EXTKD_DATA_DIR:-}" ]; then
  note "no --data and no \$EXTKD_DATA_DIR: the run looks for the dataset in tfds (downloading it). To use the files" \
    "you have, prepare them once: extkd data prepare DATASET --out=DIR [--from=PATH], then pass --data=DIR"
fi
[ -z "$VENV" ] || VENV=$(absolute_path "$VENV")

PACKAGES=(-e "${REPO_ROOT}[all]")
if [ "$JAX_EXTRA" != none ]; then PACKAGES+=("jax[$JAX_EXTRA]"); fi

require_cmd nvidia-smi "is this a GPU host with the NVIDIA driver installed?"
run nvidia-smi -L
run cd "$REPO_ROOT"

if [ -n "$VENV" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    require_cmd "$PYTHON" "needed to create the virtualenv $VENV"
    run "$PYTHON" -m venv "$VENV"
    INSTALL=1
  fi
  PYTHON=$VENV/bin/python
fi
if [ "$INSTALL" = 1 ]; then
  require_cmd "$PYTHON" "needed for --install"
  run "$PYTHON" -m pip install -U pip
  run "$PYTHON" -m pip install "${PACKAGES[@]}"
fi
if [ -n "$VENV" ]; then
  run_sh "export VIRTUAL_ENV=$(q "$VENV") PATH=$(q "$VENV/bin"):\$PATH"
fi

require_cmd "${CMD_WORDS[0]}" "install the project first (--install, or --venv DIR)"
# ${DATA_FLAG[@]+...}: nothing when empty, also under set -u in bash 3.2
run env XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION" "${CMD_WORDS[@]}" --workdir="$WORKDIR" ${DATA_FLAG[@]+"${DATA_FLAG[@]}"}
