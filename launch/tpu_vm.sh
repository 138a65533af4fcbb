#!/usr/bin/env bash
# Create a Cloud TPU VM (or pod slice), install extkd_jax on every worker, run one extkd command on all workers
# with --config.distributed.enabled=True, copy the workdir back from worker 0, and delete the VM on request.
set -euo pipefail

PROG=$(basename "$0")
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

DEFAULT_COMMAND='extkd reproduce --config=cifar10_drop'
REMOTE_REPO=extkd_jax    # on each worker, relative to the home directory
REMOTE_VENV=extkd_venv   # likewise

usage() {
  cat <<EOF
Usage: $PROG --name=NAME --zone=ZONE [options]
       $PROG --name=NAME --zone=ZONE --delete-only

Creates a TPU VM or pod slice, installs this repository on all its workers, runs one extkd command on all
workers (adding --workdir and --config.distributed.enabled=True; jax.distributed.initialize() finds the
coordinator by itself on TPU VMs), copies the workdir back from worker 0, and deletes the VM if asked.

Required:
  --name NAME              TPU VM name (lower-case letters, digits, '-'; starts with a letter)
  --zone ZONE              zone, e.g. us-central2-b (default: \$CLOUDSDK_COMPUTE_ZONE if set)

Options:
  --accelerator-type TYPE  default v4-8 (one host); e.g. v4-32, v5litepod-8, v6e-8
  --version RUNTIME        TPU software version, default tpu-ubuntu2204-base
                           (v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  --project PROJECT        GCP project for every gcloud command (default: gcloud's configured project)
  --spot                   create a Spot VM
  --preemptible            create a preemptible VM (not together with --spot)
  --repo URL               install with 'git clone URL' on each worker instead of copying this checkout
  --ref REF                branch, tag or commit to check out after cloning (needs --repo)
  --command CMD            extkd command to run, without --workdir
                           (default: '$DEFAULT_COMMAND')
  --workdir DIR            workdir on the workers: absolute path or gs://bucket/path (default /tmp/extkd_run).
                           For multi-host slices use gs://: every host reads and writes the same checkpoints,
                           metrics and reports there (etils.epath), and nothing is copied back.
  --local-results DIR      where to copy the workdir back to (default <repo>/workdirs/NAME); the copy lands in
                           DIR/<basename of --workdir>
  --skip-create            use an existing VM of that name
  --skip-install           do not copy or install the code (already installed by an earlier run)
  --delete                 delete the VM after the run (also when a step after creating it fails)
  --delete-only            only delete the VM, nothing else
  --dry-run                print every command, one per line prefixed with '+ ', and run nothing
  -h, --help               show this help

Each worker gets a Python >= 3.11 virtualenv in ~/$REMOTE_VENV (python3.11 from apt if the image has none)
with 'pip install -e .[all] jax[tpu]' of the code in ~/$REMOTE_REPO.

Example:
  $PROG --name=kd-v4 --zone=us-central2-b --spot --delete --dry-run
EOF
}

NAME=""
ZONE=${CLOUDSDK_COMPUTE_ZONE:-}
ACCELERATOR_TYPE=v4-8
RUNTIME_VERSION=tpu-ubuntu2204-base
PROJECT=""
SPOT=0
PREEMPTIBLE=0
REPO_URL=""
REF=""
COMMAND=$DEFAULT_COMMAND
WORKDIR=/tmp/extkd_run
LOCAL_RESULTS=""
SKIP_CREATE=0
SKIP_INSTALL=0
DELETE=0
DELETE_ONLY=0

while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --name | --name=*) take_value "$@"; NAME=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --zone | --zone=*) take_value "$@"; ZONE=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --accelerator-type | --accelerator-type=*) take_value "$@"; ACCELERATOR_TYPE=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --version | --version=*) take_value "$@"; RUNTIME_VERSION=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --project | --project=*) take_value "$@"; PROJECT=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --repo | --repo=*) take_value "$@"; REPO_URL=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --ref | --ref=*) take_value "$@"; REF=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --command | --command=*) take_value "$@"; COMMAND=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --workdir | --workdir=*) take_value "$@"; WORKDIR=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --local-results | --local-results=*) take_value "$@"; LOCAL_RESULTS=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --skip-create) SKIP_CREATE=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --delete) DELETE=1; shift ;;
    --delete-only) DELETE_ONLY=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) unknown_arg "$1" ;;
  esac
done

# ---- validation ----
[ -n "$NAME" ] || die "--name is required"
[[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
  die "invalid --name '$NAME': use lower-case letters, digits and '-', start with a letter, at most 63 characters"
[ -n "$ZONE" ] || die "--zone is required (or set CLOUDSDK_COMPUTE_ZONE)"
[[ $ZONE =~ ^[a-z0-9-]+$ ]] || die "invalid --zone '$ZONE' (expected something like us-central2-b)"
if [ "$SPOT" = 1 ] && [ "$PREEMPTIBLE" = 1 ]; then
  die "--spot and --preemptible cannot be used together; pick one"
fi
[[ $ACCELERATOR_TYPE =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
  die "invalid --accelerator-type '$ACCELERATOR_TYPE' (expected something like v4-8, v5litepod-16, v6e-8)"
[ -z "$REF" ] || [ -n "$REPO_URL" ] || die "--ref '$REF' needs --repo"
case $WORKDIR in
  /* | gs://?*) ;;
  *) die "--workdir must be an absolute path or a gs://bucket/path URL, got '$WORKDIR'" ;;
esac
check_command_has_no_workdir "$COMMAND"
split_command "$COMMAND"   # only to reject an unparsable --command early; it runs remotely as given
if [ "$DELETE_ONLY" = 1 ] && [ "$DELETE" = 1 ]; then
  die "--delete and --delete-only cannot be used together (--delete-only skips the run)"
fi

require_cmd gcloud "install the Google Cloud SDK (https://cloud.google.com/sdk), or use --dry-run"

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
SCOPE=(--zone="$ZONE")
if [ -n "$PROJECT" ]; then SCOPE+=(--project="$PROJECT"); fi

delete_vm() {
  run "${GCLOUD_TPU[@]}" delete "$NAME" "${SCOPE[@]}" --quiet
}

if [ "$DELETE_ONLY" = 1 ]; then
  delete_vm
  exit 0
fi

[ -n "$LOCAL_RESULTS" ] || LOCAL_RESULTS=$REPO_ROOT/workdirs/$NAME
LOCAL_RESULTS=$(absolute_path "$LOCAL_RESULTS")

SIZE=${ACCELERATOR_TYPE##*-}   # cores (v2-v4, v5p) or chips (v5e, v6e); more than 8 means several hosts
if [ "$SIZE" -gt 8 ] && [[ $WORKDIR != gs://* ]]; then
  warn "$ACCELERATOR_TYPE has several hosts but --workdir '$WORKDIR' is on each host's own disk;" \
    "use a gs:// workdir so all hosts share checkpoints (only worker 0's copy is fetched)"
fi

# With --delete, a failure after the VM exists still deletes it, so that nothing is left running.
cleanup_on_error() {
  local rc=$?
  trap - EXIT
  if [ "$rc" -ne 0 ]; then
    warn "a step failed (exit $rc); deleting TPU VM '$NAME' because of --delete"
    delete_vm || warn "could not delete '$NAME'; delete it by hand: $PROG --name=$NAME --zone=$ZONE --delete-only"
  fi
  exit "$rc"
}

# ---- 1. create ----
if [ "$SKIP_CREATE" = 0 ]; then
  CREATE=("${GCLOUD_TPU[@]}" create "$NAME" "${SCOPE[@]}" --accelerator-type="$ACCELERATOR_TYPE"
    --version="$RUNTIME_VERSION")
  if [ "$SPOT" = 1 ]; then CREATE+=(--spot); fi
  if [ "$PREEMPTIBLE" = 1 ]; then CREATE+=(--preemptible); fi
  run "${CREATE[@]}"
fi
if [ "$DELETE" = 1 ] && [ "$DRY_RUN" != 1 ]; then
  trap cleanup_on_error EXIT
  trap 'exit 130' INT TERM
fi

# ---- 2. install on all workers ----
# The remote shell: pick a Python >= 3.11 (flax and jax need it; tpu-ubuntu2204-base ships 3.10), make a venv,
# pip install -e '.[all]' 'jax[tpu]'. Single quotes on purpose: these $ expand on the worker.
# shellcheck disable=SC2016
PY_SETUP='PY=; for c in python3.13 python3.12 python3.11 python3; do'
# shellcheck disable=SC2016
PY_SETUP+=' if command -v $c >/dev/null && $c -c "import sys; sys.exit(sys.version_info < (3, 11))"; then PY=$c; break; fi;'
PY_SETUP+=' done;'
# shellcheck disable=SC2016
PY_SETUP+=' if [ -z "$PY" ]; then sudo apt-get update -qq'
PY_SETUP+=' && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv && PY=python3.11; fi;'
PY_SETUP+=" \$PY -m venv ~/$REMOTE_VENV && ~/$REMOTE_VENV/bin/python -m pip install -q -U pip"
PIP_INSTALL="cd ~/$REMOTE_REPO && ~/$REMOTE_VENV/bin/python -m pip install -e \".[all]\" \"jax[tpu]\""

if [ "$SKIP_INSTALL" = 0 ]; then
  if [ -n "$REPO_URL" ]; then
    if [ -n "$REF" ]; then
      FETCH="rm -rf ~/$REMOTE_REPO && git clone $(q "$REPO_URL") ~/$REMOTE_REPO"
      FETCH+=" && git -C ~/$REMOTE_REPO checkout $(q "$REF")"
    else
      FETCH="rm -rf ~/$REMOTE_REPO && git clone --depth=1 $(q "$REPO_URL") ~/$REMOTE_REPO"
    fi
  else
    TARBALL=${TMPDIR:-/tmp}/extkd_jax-$NAME.tar.gz
    run tar -czf "$TARBALL" -C "$REPO_ROOT" --exclude=.git --exclude=./workdirs --exclude=.jax_cache \
      --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.devdata \
      --exclude=./build --exclude=./dist .
    run "${GCLOUD_TPU[@]}" scp "$TARBALL" "$NAME:$REMOTE_REPO.tar.gz" "${SCOPE[@]}" --worker=all
    run rm -f "$TARBALL"
    FETCH="rm -rf ~/$REMOTE_REPO && mkdir -p ~/$REMOTE_REPO && tar -xzf ~/$REMOTE_REPO.tar.gz -C ~/$REMOTE_REPO"
  fi
  run "${GCLOUD_TPU[@]}" ssh "$NAME" "${SCOPE[@]}" --worker=all \
    --command="set -e; $FETCH; $PY_SETUP; $PIP_INSTALL"
fi

# ---- 3. run on all workers ----
RUN_LINE="$COMMAND --workdir=$(q "$WORKDIR")"
case " $COMMAND " in
  *" --config.distributed.enabled=True "*) ;;
  *) RUN_LINE+=" --config.distributed.enabled=True" ;;
esac
run "${GCLOUD_TPU[@]}" ssh "$NAME" "${SCOPE[@]}" --worker=all \
  --command="set -e; export PATH=~/$REMOTE_VENV/bin:\$PATH; cd ~/$REMOTE_REPO && $RUN_LINE"

# ---- 4. copy the results back from worker 0 ----
run mkdir -p "$LOCAL_RESULTS"
if [[ $WORKDIR == gs://* ]]; then
  run gcloud storage cp --recursive "$WORKDIR" "$LOCAL_RESULTS" ${PROJECT:+"--project=$PROJECT"}
else
  run "${GCLOUD_TPU[@]}" scp --worker=0 --recurse "$NAME:$WORKDIR" "$LOCAL_RESULTS" "${SCOPE[@]}"
fi

# ---- 5. delete ----
if [ "$DELETE" = 1 ]; then
  trap - EXIT
  delete_vm
fi
if [ "$DRY_RUN" != 1 ]; then
  printf '%s: done; results in %s\n' "$PROG" "$LOCAL_RESULTS" >&2
fi
