#!/usr/bin/env bash
# The test command: install, start Postgres and Redis if needed, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/services.sh
export AWQFORGE_TEST_DATABASE_URL=${AWQFORGE_TEST_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test}
export AWQFORGE_TEST_REDIS_URL=${AWQFORGE_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}
exec python3 -m pytest -q "$@"
