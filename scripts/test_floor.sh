#!/usr/bin/env bash
# CI, once: the engine's fast tests on the dependency floors of pyproject.toml, in a separate virtualenv without
# the system's site-packages (torch from the local wheel, the rest from PyPI at exactly their floors).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${AWQFORGE_FLOOR_VENV:-${TMPDIR:-/tmp}/awqforge-floor-venv}
"$PY" -m venv --clear "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "$("$PY" scripts/floors.py torch)"
# shellcheck disable=SC2046  # one word per requirement
"${PIP[@]}" $("$PY" scripts/floors.py) pytest pytest-timeout pyyaml
"${PIP[@]}" --no-deps -e .
echo "floor versions: $("$VENV/bin/python" -m pip freeze | grep -iE '^(torch|transformers|safetensors|huggingface.hub|pydantic|numpy|tqdm|pyarrow|gguf|zstandard)==' | tr '\n' ' ')"
# Fast engine tests: job spec, quantization primitives and packing, calibration (with the streamed capture),
# architectures (Mixtral's module names, the dtype= keyword), and one job end to end.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_spec.py tests/test_quant.py tests/test_packing.py tests/test_calibration.py tests/test_arch.py \
    "tests/test_pipeline.py::test_end_to_end_both_formats[llama]" "$@"
# Artifacts written with the newest transformers (this interpreter) load with the floor's (about 1 min): a
# dense, MoE, hybrid and multimodal model each (bench/bench_floor_load.py; compressed-tensors is the loader).
"${PIP[@]}" compressed-tensors "$("$PY" scripts/floors.py transformers)"
exec "$PY" bench/bench_floor_load.py --python "$VENV/bin/python"
