#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the CUDA tests, the W4A16 kernel benchmark against torch's fp16
# matmul (M = 1, 16, 256 on 11008x4096 and 4096x11008; TFLOP/s and GB/s) and an end-to-end
# `awqforge quantize` of SmolLM2-135M on --device cuda with evaluation, in under 8 minutes; writes
# one JSON summary.
#   scripts/gpu-check.sh [SUMMARY.json]      (default: $OUT/gpu-check.json, else ./gpu-check.json)
# Installs what it needs with scripts/install.sh; when the installed torch has no CUDA, it first
# installs the CUDA build of the same torch version from $AWQFORGE_CUDA_INDEX.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUMMARY=${1:-${OUT:-.}/gpu-check.json}

die() { echo "gpu-check: $*" >&2; exit 2; }

command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this needs a machine with an NVIDIA GPU and its driver"
nvidia-smi -L >/dev/null 2>&1 || die "nvidia-smi sees no GPU (driver not loaded?)"
command -v "$PY" >/dev/null 2>&1 || die "no $PY on PATH (set PYTHON=...)"

TORCH_VERSION=${AWQFORGE_TORCH_VERSION:-2.13.0}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "gpu-check: installing the CUDA build of torch $TORCH_VERSION" >&2
    "$PY" -m pip install -q --disable-pip-version-check \
        --index-url "${AWQFORGE_CUDA_INDEX:-https://download.pytorch.org/whl/cu128}" "torch==$TORCH_VERSION" \
        || die "could not install a CUDA torch (set AWQFORGE_CUDA_INDEX to a reachable index)"
fi
AWQFORGE_TORCH_VERSION=$TORCH_VERSION PYTHON="$PY" bash scripts/install.sh
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "torch $("$PY" -c 'import torch; print(torch.__version__)') still sees no CUDA device"
"$PY" -c 'import triton' 2>/dev/null || die "triton is not installed (it comes with CUDA torch builds)"

mkdir -p "$(dirname "$SUMMARY")"
exec timeout 480 "$PY" scripts/gpu_check.py "$SUMMARY"
