#!/usr/bin/env bash
# The accelerator check, on one GPU, in about 7 minutes (an H100/H200):
#   0. cuDNN attention equals XLA attention (value and gradient) on this GPU;
#   1. ViT-B/16 bf16 train step, batch 256, side by side with open_clip (same architecture, batch,
#      bf16 autocast, AdamW, ClipLoss) in the same run: images/s, MFU against the chip's bf16
#      matmul peak measured in the same process, compile time, peak device memory; with XLA's
#      attention and with cuDNN's;
#   2. the same for ViT-B/32 at batch 512;
#   3. gathered vs ring InfoNCE at 64k and 256k global batch (D=512): time and memory.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Needs jax with CUDA, flax, optax, orbax, ml-collections, torch and open_clip_torch (no
# TensorFlow). Each part has its own time limit and log in OUT_DIR, so one failing part does not
# stop the others.
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s"
}

part env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $py -c 'import jax, flax, optax, orbax.checkpoint, torch, open_clip; \
print(\"jax\", jax.__version__, jax.devices(), \"flax\", flax.__version__, \"optax\", \
optax.__version__, \"torch\", torch.__version__, \"open_clip\", open_clip.__version__)'"
part cudnn_test 90 env CUDA_VISIBLE_DEVICES=0 "$py" -m pytest -q -p no:cacheprovider \
  tests/test_models.py -k cudnn
part train_b16 240 "$py" benchmarks/train_step.py --presets B/16 --dtypes bfloat16 \
  --batch B/16=256 --steps 20 --compare open_clip
part train_b16_cudnn 150 "$py" benchmarks/train_step.py --presets B/16 --dtypes bfloat16 \
  --batch B/16=256 --steps 20 --attention cudnn --compare open_clip
part train_b32 150 "$py" benchmarks/train_step.py --presets B/32 --dtypes bfloat16 \
  --batch B/32=512 --steps 20 --compare open_clip
part loss 150 "$py" benchmarks/loss.py --accelerator --steps 3
