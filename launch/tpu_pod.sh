#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create the slice, install clipjax on every worker, run the
# trainer on all workers at once (JAX auto-detects the pod: no coordinator flags), then delete.
#
#   launch/tpu_pod.sh --name clip-b16 --zone us-central2-b --type v4-32 [--slices N] \
#       [--version tpu-ubuntu2204-base] [--repo URL|--src DIR] [--keep] [--dry-run] \
#       -- --config experiments/b16_laion.py --workdir gs://BUCKET/clip-b16
#
# Everything after `--` is passed to `python -m clipjax.train`. --dry-run prints the gcloud
# commands instead of running them. Once created, the slice is deleted on any exit (success, a
# failed step, Ctrl-C, kill) unless --keep. Each step is a separate command, so a failed step can
# be rerun by hand from the printed line (with --keep).
# --slices N > 1: N slices of --type joined over the data-centre network (multi-slice), created
# as one queued resource (nodes NAME-0 .. NAME-{N-1}); the TPU runtime sets the MEGASCALE_*
# environment that joins them, and the trainer gets --config.mesh.slices=N (data parallel across
# slices, the configured fsdp/tensor axes inside each).
set -euo pipefail

NAME="" ZONE="" TYPE="" VERSION="tpu-ubuntu2204-base" REPO="" SRC="." KEEP=0 DRY=0 PROJECT=""
SLICES=1
usage() { sed -n '2,16p' "$0"; exit "${1:-2}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --slices) SLICES="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --src) SRC="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; usage ;;
  esac
done
TRAIN_ARGS=("$@")
for v in NAME ZONE TYPE; do
  [[ -n "${!v}" ]] || { echo "tpu_pod.sh: --${v,,} is required" >&2; usage; }
done
[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || { echo "tpu_pod.sh: give trainer flags after --" >&2; usage; }
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || { echo "tpu_pod.sh: --slices must be a positive integer, got '$SLICES'" >&2; usage; }
if [[ $SLICES -gt 1 ]]; then
  TRAIN_ARGS+=("--config.mesh.slices=$SLICES")
  NODES=()
  for ((i = 0; i < SLICES; i++)); do NODES+=("$NAME-$i"); done
else
  NODES=("$NAME")
fi

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")

run() {  # print, and execute unless --dry-run
  printf '%q ' "$@"; echo
  [[ $DRY -eq 1 ]] || "$@"
}

quoted_args=$(printf '%q ' "${TRAIN_ARGS[@]}")
if [[ -n "$REPO" ]]; then
  fetch="rm -rf clipjax-src && git clone --depth 1 $(printf '%q' "$REPO") clipjax-src"
else
  fetch="test -d clipjax-src"  # copied by the scp step below
fi
setup="$fetch && cd clipjax-src && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
&& .venv/bin/pip install -q -c constraints.txt -e '.[tpu]'"
train="cd clipjax-src && .venv/bin/python -m clipjax.train $quoted_args"

QUEUED=(gcloud compute tpus queued-resources)
if [[ $SLICES -gt 1 ]]; then
  DELETE=("${QUEUED[@]}" delete "$NAME" "${COMMON[@]}" --force --quiet)
else
  DELETE=("${GCLOUD[@]}" delete "$NAME" "${COMMON[@]}" --quiet)
fi

cleanup() {  # on every exit after the slice exists: delete it, unless --keep
  local status=$?
  trap - EXIT INT TERM HUP
  if [[ $KEEP -eq 0 ]]; then
    if ! run "${DELETE[@]}"; then
      echo "tpu_pod.sh: could not delete $NAME; delete it by hand:" >&2
      echo "  $(printf '%q ' "${DELETE[@]}")" >&2
      [[ $status -ne 0 ]] || status=1
    fi
  else
    echo "tpu_pod.sh: --keep: $NAME is still running (and billed); delete it with:" >&2
    echo "  $(printf '%q ' "${DELETE[@]}")" >&2
  fi
  exit "$status"
}

# Only after a successful create: a failed create may mean the name belongs to another slice.
if [[ $SLICES -gt 1 ]]; then
  run "${QUEUED[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type "$TYPE" \
    --runtime-version "$VERSION" --node-count "$SLICES" --node-prefix "$NAME"
else
  run "${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type "$TYPE" --version "$VERSION"
fi
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
if [[ $SLICES -gt 1 && $DRY -eq 0 ]]; then  # a queued resource is granted later: wait for it
  echo "tpu_pod.sh: waiting for queued resource $NAME to become ACTIVE"
  while :; do
    state=$("${QUEUED[@]}" describe "$NAME" "${COMMON[@]}" --format='value(state.state)')
    [[ "$state" == ACTIVE ]] && break
    case "$state" in FAILED|SUSPENDED) echo "tpu_pod.sh: $NAME is $state" >&2; exit 1 ;; esac
    sleep 30
  done
fi
for node in "${NODES[@]}"; do
  if [[ -z "$REPO" ]]; then
    run "${GCLOUD[@]}" scp --recurse "$SRC" "$node:clipjax-src" "${COMMON[@]}" --worker=all
  fi
  run "${GCLOUD[@]}" ssh "$node" "${COMMON[@]}" --worker=all --command "$setup"
done
# Every worker of every slice starts the trainer at once; they wait for each other in
# jax.distributed.initialize.
pids=()
for node in "${NODES[@]}"; do
  run "${GCLOUD[@]}" ssh "$node" "${COMMON[@]}" --worker=all --command "$train" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
