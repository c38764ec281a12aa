#!/usr/bin/env bash
# The main job: install, start the service on its embedded defaults (SQLite, a local broker, a local hub
# folder), submit one real AWQ job on SmolLM2-135M-Instruct over HTTP (and an RTN one to compare), show
# progress, metrics and artifacts, then point at the dashboard.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "AWQForge demo: installing the runtime (torch, the model file, awqforge[service]; no apt, no test tools)..."
AWQFORGE_INSTALL_VERBOSE=1 bash scripts/install.sh
echo "==> starting the service and the demo job"
exec awqforge serve --demo "$@"
