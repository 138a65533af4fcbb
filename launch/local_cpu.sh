#!/usr/bin/env bash
# Smoke run on this machine's CPU: pip install -e '.[all]' and extkd reproduce --config=smoke.
set -euo pipefail

PROG=$(basename "$0")
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG [options]

Installs the project into the current python3 (pip install -e '.[all]') and runs, with JAX_PLATFORMS=cpu, from the
repository root:
  extkd reproduce --config=smoke --workdir=WORKDIR

Options:
  --workdir DIR   run directory (default: \$WORKDIR or /tmp/extkd_smoke; relative to where you are)
  --no-install    skip the install (the project is installed already)
  --dry-run       print every command, one per line prefixed with '+ ', and run nothing
  -h, --help      show this help
EOF
}

WORKDIR=${WORKDIR:-/tmp/extkd_smoke}
INSTALL=1
PYTHON=${PYTHON:-python3}

while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --workdir | --workdir=*) take_value "$@"; WORKDIR=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --no-install) INSTALL=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) unknown_arg "$1" ;;
  esac
done

WORKDIR=$(absolute_path "$WORKDIR")

run cd "$REPO_ROOT"
if [ "$INSTALL" = 1 ]; then
  require_cmd "$PYTHON" "needed to install the project (or pass --no-install)"
  run "$PYTHON" -m pip install -e "${REPO_ROOT}[all]"
fi
require_cmd extkd "install the project first (drop --no-install)"
run env JAX_PLATFORMS=cpu extkd reproduce --config=smoke --workdir="$WORKDIR"
