#!/usr/bin/env bash
# The main job: install, start the service on its embedded defaults (SQLite, a local broker, a local hub
# folder), submit one real AWQ job on SmolLM2-135M-Instruct over HTTP, show progress, metrics and artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec awqforge serve --demo "$@"
