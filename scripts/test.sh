#!/usr/bin/env bash
# The test command: the runtime (scripts/install.sh), then what only the tests use, each step said as it
# runs: the [dev] extra (pytest, Playwright, the moto S3 server, schemathesis, ruff, hadolint, Triton for the
# kernel tests), Debian's chromium for the dashboard's browser tests and docker-compose for the compose file's
# check; then PostgreSQL and Redis if they are not running, and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { echo "==> $*"; }
bash scripts/install.sh
step "test tools: pip install -e .[dev] (pytest, Playwright, moto, schemathesis, ruff, hadolint, triton)"
"$PY" -m pip install -q --disable-pip-version-check -e ".[dev]"
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
# The dashboard tests drive Debian's chromium with Playwright (no browser download).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    step "chromium (apt-get; the dashboard's browser tests, tests/service/test_dashboard.py)"
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium \
        || echo "test.sh: could not install chromium: the browser tests will be skipped" >&2
fi
# Debian's docker-compose validates docker-compose.yml (tests/service/test_deploy.py).
if ! command -v docker-compose >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    step "docker-compose (apt-get; checks docker-compose.yml, tests/service/test_deploy.py)"
    (DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q docker-compose >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q docker-compose >/dev/null; }) \
        || echo "test.sh: could not install docker-compose (needed by tests/service/test_deploy.py)" >&2
fi
step "PostgreSQL and Redis (scripts/services.sh)"
bash scripts/services.sh
export AWQFORGE_TEST_DATABASE_URL=${AWQFORGE_TEST_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test}
export AWQFORGE_TEST_REDIS_URL=${AWQFORGE_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}
# The whole suite in three processes side by side: the engine's tests, and the service tests in two halves
# (each its own package-scoped stack: a Postgres database, a Redis prefix, a Celery worker, an API server;
# they wait on those processes about half the time, so two halves beside the engine's fill the cores). Each
# prints its own report, then its exit status counts. AWQFORGE_TEST_PROCESSES=1 (or naming tests) runs one
# pytest as usual.
# The service half that runs jobs through killed and faulted workers; every other service file (new ones too)
# goes to the other half.
SERVICE_A="tests/service/test_faults.py tests/service/test_faults_reconcile.py tests/service/test_publish_retry.py
    tests/service/test_embedded.py tests/service/test_scaleout.py tests/service/test_eval_tasks.py
    tests/service/test_routing.py"
if [ $# -eq 0 ] && [ "${AWQFORGE_TEST_PROCESSES:-2}" = 2 ]; then
    step "pytest: the engine's tests and the service tests (two halves) in three processes"
    LOGS=$(mktemp -d)
    export AWQFORGE_TEST_PROCESSES=2  # tests/conftest.py: the engine's torch takes half the cores
    IGNORE=""
    for f in $SERVICE_A; do IGNORE="$IGNORE --ignore=$f"; done
    # shellcheck disable=SC2086  # the file lists split on spaces
    "$PY" -m pytest -q $SERVICE_A >"$LOGS/service-a.log" 2>&1 &
    SA=$!
    # shellcheck disable=SC2086
    "$PY" -m pytest -q tests/service $IGNORE >"$LOGS/service-b.log" 2>&1 &
    SB=$!
    "$PY" -m pytest -q tests --ignore=tests/service >"$LOGS/engine.log" 2>&1 &
    ENGINE=$!
    ra=0; wait "$SA" || ra=$?
    rb=0; wait "$SB" || rb=$?
    re=0; wait "$ENGINE" || re=$?
    echo "==> the engine's tests (exit $re)"; cat "$LOGS/engine.log"
    echo "==> the service tests, jobs under faults (exit $ra)"; cat "$LOGS/service-a.log"
    echo "==> the other service tests (exit $rb)"; cat "$LOGS/service-b.log"
    rm -rf "$LOGS"
    [ "$ra" = 0 ] && [ "$rb" = 0 ] && [ "$re" = 0 ]
    exit
fi
step "pytest"
exec "$PY" -m pytest -q "$@"
