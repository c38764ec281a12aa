#!/usr/bin/env bash
# The installation once more in a fresh virtualenv (`python -m venv`, no system site-packages) as a new user
# makes it: scripts/install.sh, the [dev] extra, and the tests that exercise an installation (the wheel in a
# virtualenv, the command line). About 6 min on 2 cores; not part of .ci/run (its 20-min budget).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AWQFORGE_CI_VENV:-${TMPDIR:-/tmp}/awqforge-ci-venv}
echo "==> a fresh virtualenv: $VENV"
python3 -m venv --clear "$VENV"
PYTHON="$VENV/bin/python" bash scripts/install.sh
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
export AWQFORGE_TEST_DATABASE_URL=${AWQFORGE_TEST_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test}
export AWQFORGE_TEST_REDIS_URL=${AWQFORGE_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}
PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/service/test_packaging.py \
    tests/test_cli.py -k "not test_quantize_then_eval"
