#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create the slice, install clipjax on every worker, run the
# trainer on all workers at once (JAX auto-detects the pod: no coordinator flags), then delete.
#
#   launch/tpu_pod.sh --name clip-b16 --zone us-central2-b --type v4-32 \
#       [--version tpu-ubuntu2204-base] [--repo URL|--src DIR] [--keep] [--dry-run] \
#       -- --config experiments/b16_laion.py --workdir gs://BUCKET/clip-b16
#
# Everything after `--` is passed to `python -m clipjax.train`. --dry-run prints the gcloud
# commands instead of running them. Once created, the slice is deleted on any exit (success, a
# failed step, Ctrl-C, kill) unless --keep. Each step is a separate command, so a failed step can
# be rerun by hand from the printed line (with --keep).
set -euo pipefail

NAME="" ZONE="" TYPE="" VERSION="tpu-ubuntu2204-base" REPO="" SRC="." KEEP=0 DRY=0 PROJECT=""
usage() { sed -n '2,12p' "$0"; exit "${1:-2}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
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

cleanup() {  # on every exit after the slice exists: delete it, unless --keep
  local status=$?
  trap - EXIT INT TERM HUP
  if [[ $KEEP -eq 0 ]]; then
    if ! run "${GCLOUD[@]}" delete "$NAME" "${COMMON[@]}" --quiet; then
      echo "tpu_pod.sh: could not delete slice $NAME; delete it by hand:" >&2
      echo "  $(printf '%q ' "${GCLOUD[@]}" delete "$NAME" "${COMMON[@]}")" >&2
      [[ $status -ne 0 ]] || status=1
    fi
  else
    echo "tpu_pod.sh: --keep: slice $NAME is still running (and billed); delete it with:" >&2
    echo "  $(printf '%q ' "${GCLOUD[@]}" delete "$NAME" "${COMMON[@]}")" >&2
  fi
  exit "$status"
}

# Only after a successful create: a failed create may mean the name belongs to another slice.
run "${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type "$TYPE" --version "$VERSION"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
if [[ -z "$REPO" ]]; then
  run "${GCLOUD[@]}" scp --recurse "$SRC" "$NAME:clipjax-src" "${COMMON[@]}" --worker=all
fi
run "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command "$setup"
run "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command "$train"
