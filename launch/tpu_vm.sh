#!/usr/bin/env bash
# Create a Cloud TPU VM (or pod slice), install extkd_jax on every worker, start one extkd command on all workers
# (detached, with --config.distributed.enabled=True), wait for it, re-create the VM and resume after a Spot
# preemption if asked, copy a local workdir back from worker 0, and delete the VM on request.
set -euo pipefail

PROG=$(basename "$0")
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

DEFAULT_COMMAND='extkd reproduce --config=cifar10_drop'
REMOTE_REPO=extkd_jax    # on each worker, relative to the home directory
REMOTE_VENV=extkd_venv   # likewise
REMOTE_LOGS=extkd_logs   # likewise: extkd_logs/NAME/{worker-W.log,status,pid}
METADATA=http://metadata.google.internal/computeMetadata/v1/instance/attributes

usage() {
  cat <<EOF
Usage: $PROG --name=NAME --zone=ZONE [options]
       $PROG --name=NAME --zone=ZONE --delete-only

Creates a TPU VM or pod slice, installs this repository on all its workers, starts one extkd command on all
workers (adding --workdir, --config.data.dir from --data, and --config.distributed.enabled=True;
jax.distributed.initialize() finds the coordinator by itself on TPU VMs), waits for it, and deletes the VM if asked.

The job runs detached (nohup setsid): it survives this script and its ssh session. Each worker W logs to
~/$REMOTE_LOGS/NAME/worker-W.log; when the job ends the log is copied to <workdir>/logs/worker-W.log (gs:// with
'gcloud storage cp'), and its exit status is written to ~/$REMOTE_LOGS/NAME/status. W is the worker number
(\$TPU_WORKER_ID, else the VM metadata's agent-worker-number, else the host name).

Results: a gs:// workdir stays in the bucket (nothing is copied back; read it with 'gcloud storage' or
extkd_jax.load("gs://...")). A local workdir (single-host VMs only) is copied back from worker 0 to --local-results.

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
  --command CMD            extkd command to run, without --workdir or --config.data.dir
                           (default: '$DEFAULT_COMMAND')
  --workdir DIR            workdir on the workers: gs://bucket/path or an absolute path (default /tmp/extkd_run).
                           A slice with several hosts (more than 8 cores or chips, e.g. v4-32) needs gs://:
                           every host reads and writes the same checkpoints, metrics and reports there.
  --data DIR               the dataset, passed as --config.data.dir=DIR: gs://bucket/path (or an absolute path on
                           the workers) of an npz folder made once with
                             extkd data prepare DATASET --out=gs://BUCKET/data
                           Without it each worker finds the data itself (\$EXTKD_DATA_DIR/DATASET, else tfds,
                           downloading it).
  --relaunch N             after a preemption (the VM PREEMPTED, stopped or gone), delete and re-create the VM,
                           install and start the same command again, up to N times; the run resumes from the
                           checkpoints in the workdir, so N > 0 needs a gs:// workdir (default 0: stop)
  --poll SECONDS           how often to check the job and the VM while waiting (default 60)
  --local-results DIR      where to copy a local workdir back to (default <repo>/workdirs/NAME); the copy lands in
                           DIR/<basename of --workdir>. Not for a gs:// workdir.
  --skip-create            use an existing VM of that name
  --skip-install           do not copy or install the code (already installed by an earlier run)
  --delete                 delete the VM after the run (also when a step after creating it fails)
  --delete-only            only delete the VM, nothing else
  --dry-run                print every command, one per line prefixed with '+ ', and run nothing (the wait is
                           shown as one check of the VM's state and of the job's status)
  -h, --help               show this help

Each worker gets a Python >= 3.11 virtualenv in ~/$REMOTE_VENV (python3.11 from apt if the image has none)
with 'pip install -e .[all] jax[tpu]' of the code in ~/$REMOTE_REPO.

Example (a Spot v4-32 slice, data and workdir in a bucket, up to 3 relaunches after preemptions):
  $PROG --name=kd-v4 --zone=us-central2-b --accelerator-type=v4-32 --spot --relaunch=3 --delete \\
      --data=gs://MY_BUCKET/data --workdir=gs://MY_BUCKET/cifar10_drop --dry-run
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
DATA=""
RELAUNCH=0
POLL=60
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
    --data | --data=*) take_value "$@"; DATA=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --relaunch | --relaunch=*) take_value "$@"; RELAUNCH=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
    --poll | --poll=*) take_value "$@"; POLL=$FLAG_VALUE; shift "$FLAG_SHIFT" ;;
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
case $DATA in
  "" | /* | gs://?*) ;;
  *) die "--data must be a gs://bucket/path URL or an absolute path on the workers, got '$DATA'" ;;
esac
[[ $RELAUNCH =~ ^[0-9]+$ ]] || die "--relaunch must be a whole number of relaunches (0 or more), got '$RELAUNCH'"
[[ $POLL =~ ^[0-9]+$ ]] || die "--poll must be a whole number of seconds, got '$POLL'"
check_command_has_no_workdir "$COMMAND"
case " $COMMAND" in
  *" --config.data.dir"*) die "--command must not contain --config.data.dir; pass the data with --data: $COMMAND" ;;
esac
split_command "$COMMAND"   # only to reject an unparsable --command early; it runs remotely as given
if [ "$DELETE_ONLY" = 1 ] && [ "$DELETE" = 1 ]; then
  die "--delete and --delete-only cannot be used together (--delete-only skips the run)"
fi

SIZE=${ACCELERATOR_TYPE##*-}   # cores (v2-v4, v5p) or chips (v5e, v6e); more than 8 means several hosts
if [[ $WORKDIR != gs://* ]]; then
  if [ "$SIZE" -gt 8 ] && [ "$DELETE_ONLY" = 0 ]; then
    die "--workdir '$WORKDIR' is on each host's own disk, but $ACCELERATOR_TYPE has several hosts: use" \
      "--workdir=gs://BUCKET/PATH so that all hosts share the checkpoints, metrics and reports"
  fi
  if [ "$RELAUNCH" -gt 0 ]; then
    die "--relaunch=$RELAUNCH needs a gs:// --workdir to resume from (a local '$WORKDIR' is lost with the VM)"
  fi
elif [ -n "$LOCAL_RESULTS" ]; then
  die "--local-results is only for a local --workdir: a gs:// workdir ('$WORKDIR') is not copied back"
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

if [ -z "$DATA" ]; then
  note "no --data: each worker finds the dataset itself (\$EXTKD_DATA_DIR/DATASET, else tfds, downloading it).
For a pod, prepare it once in a bucket (DATASET: the preset's data.name, e.g. cifar10), then pass it:
  extkd data prepare DATASET --out=gs://BUCKET/data
  $PROG ... --data=gs://BUCKET/data"
fi
if [[ $WORKDIR != gs://* ]]; then
  [ -n "$LOCAL_RESULTS" ] || LOCAL_RESULTS=$REPO_ROOT/workdirs/$NAME
  LOCAL_RESULTS=$(absolute_path "$LOCAL_RESULTS")
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
create_vm() {
  local create=("${GCLOUD_TPU[@]}" create "$NAME" "${SCOPE[@]}" --accelerator-type="$ACCELERATOR_TYPE"
    --version="$RUNTIME_VERSION")
  if [ "$SPOT" = 1 ]; then create+=(--spot); fi
  if [ "$PREEMPTIBLE" = 1 ]; then create+=(--preemptible); fi
  run "${create[@]}"
}

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

install_code() {
  local fetch tarball
  if [ -n "$REPO_URL" ]; then
    if [ -n "$REF" ]; then
      fetch="rm -rf ~/$REMOTE_REPO && git clone $(q "$REPO_URL") ~/$REMOTE_REPO"
      fetch+=" && git -C ~/$REMOTE_REPO checkout $(q "$REF")"
    else
      fetch="rm -rf ~/$REMOTE_REPO && git clone --depth=1 $(q "$REPO_URL") ~/$REMOTE_REPO"
    fi
  else
    tarball=${TMPDIR:-/tmp}/extkd_jax-$NAME.tar.gz
    run tar -czf "$tarball" -C "$REPO_ROOT" --exclude=.git --exclude=./workdirs --exclude=.jax_cache \
      --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.devdata \
      --exclude=./build --exclude=./dist .
    run "${GCLOUD_TPU[@]}" scp "$tarball" "$NAME:$REMOTE_REPO.tar.gz" "${SCOPE[@]}" --worker=all
    run rm -f "$tarball"
    fetch="rm -rf ~/$REMOTE_REPO && mkdir -p ~/$REMOTE_REPO && tar -xzf ~/$REMOTE_REPO.tar.gz -C ~/$REMOTE_REPO"
  fi
  run "${GCLOUD_TPU[@]}" ssh "$NAME" "${SCOPE[@]}" --worker=all \
    --command="set -e; $fetch; $PY_SETUP; $PIP_INSTALL"
}

# ---- 3. start the job on all workers, detached ----
RUN_LINE="$COMMAND --workdir=$(q "$WORKDIR")"
if [ -n "$DATA" ]; then RUN_LINE+=" --config.data.dir=$(q "$DATA")"; fi
case " $COMMAND " in
  *" --config.distributed.enabled=True "*) ;;
  *) RUN_LINE+=" --config.distributed.enabled=True" ;;
esac
# shellcheck disable=SC2088  # the ~ expands on the worker
LOGS="~/$REMOTE_LOGS/$NAME"
# The job, run by 'bash -c JOB extkd-job LOGS WORKER WORKDIR COMMAND...' in its own session: it records its pid,
# runs the command into the worker's log, copies the log into the workdir, then writes the exit status.
# Single quotes on purpose: these $ expand in the job's shell.
# shellcheck disable=SC2016
JOB='L=$1; W=$2; D=$3; shift 3; echo $$ > "$L/pid"; "$@" > "$L/worker-$W.log" 2>&1; s=$?;'
# shellcheck disable=SC2016
JOB+=' case $D in gs://*) gcloud storage cp "$L/worker-$W.log" "$D/logs/worker-$W.log" ;;'
# shellcheck disable=SC2016
JOB+=' *) mkdir -p "$D/logs" && cp "$L/worker-$W.log" "$D/logs/" ;; esac > "$L/copy.log" 2>&1; echo $s > "$L/status"'
START="set -e; export PATH=~/$REMOTE_VENV/bin:\$PATH; cd ~/$REMOTE_REPO;"
START+=" W=\${TPU_WORKER_ID:-\$(curl -sf -m 5 -H Metadata-Flavor:Google $METADATA/agent-worker-number || hostname)};"
START+=" L=$LOGS; mkdir -p \$L; rm -f \$L/status \$L/pid;"
START+=" nohup setsid bash -c '$JOB' extkd-job \$L \$W $(q "$WORKDIR") $RUN_LINE > /dev/null 2>&1 < /dev/null &"
START+=" echo \"worker \$W: started; log \$L/worker-\$W.log\""

start_job() {
  run "${GCLOUD_TPU[@]}" ssh "$NAME" "${SCOPE[@]}" --worker=all --command="$START"
}

# ---- 4. wait: sets OUTCOME to done, failed (JOB_STATUS) or preempted (VM_STATE) ----
DESCRIBE=("${GCLOUD_TPU[@]}" describe "$NAME" "${SCOPE[@]}" --format='value(state)')
STATUS_CHECK=("${GCLOUD_TPU[@]}" ssh "$NAME" "${SCOPE[@]}" --worker=0 --command="cat $LOGS/status 2>/dev/null || true")

vm_state() {   # the VM's state (READY, PREEMPTED, ...), or GONE when it cannot be described
  VM_STATE=$("${DESCRIBE[@]}" 2>/dev/null) || VM_STATE=GONE
  VM_STATE=${VM_STATE//[[:space:]]/}
}

is_down() {
  case $VM_STATE in
    PREEMPTED | TERMINATED | STOPPING | STOPPED | DELETING | GONE) return 0 ;;
    *) return 1 ;;
  esac
}

wait_for_job() {
  if [ "$DRY_RUN" = 1 ]; then
    run "${DESCRIBE[@]}"
    run "${STATUS_CHECK[@]}"
    OUTCOME="done"
    return 0
  fi
  printf '%s: waiting for the job (every %ss): %s; then %s\n' "$PROG" "$POLL" "$(q "${DESCRIBE[@]}")" \
    "$(q "${STATUS_CHECK[@]}")" >&2
  while :; do
    vm_state
    if is_down; then
      OUTCOME=preempted
      return 0
    fi
    JOB_STATUS=$("${STATUS_CHECK[@]}" 2>/dev/null) || JOB_STATUS=""
    JOB_STATUS=${JOB_STATUS//[[:space:]]/}
    if [ "$JOB_STATUS" = 0 ]; then
      OUTCOME="done"
      return 0
    elif [ -n "$JOB_STATUS" ]; then
      sleep "$POLL"   # a job stopped by a preemption's SIGTERM exits before its VM goes down: look again
      vm_state
      if is_down; then OUTCOME=preempted; else OUTCOME=failed; fi
      return 0
    fi
    sleep "$POLL"
  done
}

# a local workdir comes back from worker 0 (also after a failed job); a gs:// one stays in the bucket
copy_back() {
  if [[ $WORKDIR != gs://* ]]; then
    run mkdir -p "$LOCAL_RESULTS" &&
      run "${GCLOUD_TPU[@]}" scp --worker=0 --recurse "$NAME:$WORKDIR" "$LOCAL_RESULTS" "${SCOPE[@]}"
  fi
}

if [ "$SKIP_CREATE" = 0 ]; then create_vm; fi
if [ "$DELETE" = 1 ] && [ "$DRY_RUN" != 1 ]; then
  trap cleanup_on_error EXIT
  trap 'exit 130' INT TERM
fi
if [ "$SKIP_INSTALL" = 0 ]; then install_code; fi
start_job
RELAUNCHED=0
while :; do
  wait_for_job
  case $OUTCOME in
    done) break ;;
    failed)
      warn "the job failed on worker 0 (exit status $JOB_STATUS); each worker's log is ~/$REMOTE_LOGS/$NAME/worker-W.log" \
        "(and $WORKDIR/logs/): $(q "${GCLOUD_TPU[@]}" ssh "$NAME" "${SCOPE[@]}" --worker=all \
          --command="tail -n 30 $LOGS/worker-*.log")"
      [[ $JOB_STATUS =~ ^[0-9]+$ ]] && [ "$JOB_STATUS" -gt 0 ] && [ "$JOB_STATUS" -lt 256 ] || JOB_STATUS=1
      # what the job left (a report of diverged methods: exit 3; logs; checkpoints to resume from) comes back too,
      # before --delete removes the VM
      copy_back || warn "could not copy $WORKDIR back from worker 0"
      exit "$JOB_STATUS"
      ;;
    preempted)
      if [ "$RELAUNCHED" -ge "$RELAUNCH" ]; then
        warn "TPU VM '$NAME' is down (state $VM_STATE) before the job finished; the checkpoints in $WORKDIR are" \
          "kept: run the same command again (or with --relaunch=N) to re-create the VM and resume"
        exit 75
      fi
      RELAUNCHED=$((RELAUNCHED + 1))
      warn "TPU VM '$NAME' is down (state $VM_STATE): relaunch $RELAUNCHED of $RELAUNCH, re-creating it and" \
        "resuming from the checkpoints in $WORKDIR"
      if [ "$VM_STATE" != GONE ]; then delete_vm; fi
      create_vm
      install_code
      start_job
      ;;
  esac
done

# ---- 5. copy a local workdir back from worker 0 (a gs:// one stays in the bucket) ----
copy_back

# ---- 6. delete ----
if [ "$DELETE" = 1 ]; then
  trap - EXIT
  delete_vm
fi
if [ "$DRY_RUN" != 1 ]; then
  printf '%s: done; results in %s\n' "$PROG" "${LOCAL_RESULTS:-$WORKDIR}" >&2
fi
