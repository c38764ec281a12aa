#!/usr/bin/env bash
# Build the API and worker images, bring the compose stack up, run one tiny job through it, tear it down.
#
#   bash scripts/docker-check.sh
#
# Base images: the official ones (python:3.11 slim, nvidia/cuda runtime, postgres, redis, minio) when a
# registry answers; otherwise (LOCAL_BASES=auto, the default, or LOCAL_BASES=1) local stand-ins:
#   awqf-local/python:bookworm    Debian bookworm from debootstrap + `docker import`, with this host's CA
#                                 certificates and /etc/pip.conf, so pip in the build reaches the index as
#                                 the host does (builds run with --network host)
#   awqf-local/redis:bookworm     + Debian's redis-server (entrypoint as the official image's)
#   awqf-local/postgres:bookworm  + Debian's PostgreSQL 15 (entrypoint: initdb from POSTGRES_*)
#   awqf-local/s3:moto            moto's S3 server in place of MinIO (a compose override: its command and
#                                 healthcheck differ from MinIO's)
# and the CPU worker's torch from a local wheel (TORCH_WHEELS, default: the folders in pip's find-links),
# served on loopback to that build only; the CUDA worker still asks its index for the CUDA torch.
# The Dockerfile and docker-compose.yml take all of these as build arguments / variables: a normal
# deployment uses the official images.
#
# Environment: WORK (scratch folder, /tmp/awqf-docker-check), API_PORT (18000), BUILD_CUDA (1: also build
# the CUDA worker target; 0: skip it), KEEP=1 (leave the stack up), LOCAL_BASES (auto|1|0).
# Starts dockerd itself when none answers (root, Debian's docker.io) and stops it again at the end.
# Takes minutes and several GB of disk (the CUDA worker alone is several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT=awqf-check
WORK=${WORK:-/tmp/awqf-docker-check}
API_PORT=${API_PORT:-18000}
BUILD_CUDA=${BUILD_CUDA:-1}
LOCAL_BASES=${LOCAL_BASES:-auto}
PY_BASE=awqf-local/python:bookworm
mkdir -p "$WORK"
say() { printf '\n== %s\n' "$*"; }
T_START=$(date +%s)
REPORT="$WORK/report.txt"
: >"$REPORT"
note() { echo "$*" | tee -a "$REPORT"; }

STARTED_DOCKERD=
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd (log: $WORK/dockerd.log)"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null
fi
ENV_FILE="$WORK/.env"
OVERRIDE="$WORK/compose.check.yml"
WHEEL_PID=
rm -f "$OVERRIDE"
compose() { docker-compose -p "$PROJECT" --env-file "$ENV_FILE" -f docker-compose.yml -f "$OVERRIDE" "$@"; }
cleanup() {
    local rc=$?
    set +e
    if [ -z "${KEEP:-}" ] && [ -f "$OVERRIDE" ]; then
        compose logs --no-color --tail 80 >"$WORK/compose.log" 2>&1
        compose down -v --remove-orphans >/dev/null 2>&1
        docker image prune -f >/dev/null 2>&1
    fi
    if [ -n "$WHEEL_PID" ]; then kill "$WHEEL_PID" 2>/dev/null; fi
    if [ -n "$STARTED_DOCKERD" ] && [ -z "${KEEP:-}" ]; then kill "$STARTED_DOCKERD"; wait "$STARTED_DOCKERD" 2>/dev/null; fi
    echo
    echo "total: $(($(date +%s) - T_START)) s" >>"$REPORT"
    cat "$REPORT"
    echo "exit $rc (logs: $WORK/compose.log)"
}
trap cleanup EXIT
df -h / | tail -1 | awk '{print "disk: " $4 " free on /"}'

if [ "$LOCAL_BASES" = auto ]; then
    # the Docker Hub registry answers 401 to an anonymous /v2/ when it is reachable
    code=$(curl -s -o /dev/null -m 10 -w '%{http_code}' https://registry-1.docker.io/v2/ || true)
    if [ "$code" = 401 ] || [ "$code" = 200 ]; then LOCAL_BASES=0; else LOCAL_BASES=1; fi
fi

timed() {  # timed LABEL CMD...: run, record the wall time
    local label=$1 t0 t1; shift
    t0=$(date +%s)
    "$@"
    t1=$(date +%s)
    note "time $label: $((t1 - t0)) s"
}

# ---- local base images ----------------------------------------------------------------------------
local_build() {  # local_build TAG: a Dockerfile on stdin, no context
    docker build --network host -q -t "$1" - >/dev/null
}

python_base() {
    docker image inspect "$PY_BASE" >/dev/null 2>&1 && return
    local root="$WORK/rootfs-python"
    rm -rf "$root"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-dev,python-is-python3,g++,ca-certificates,curl \
        bookworm "$root" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 ||
        { tail -20 "$WORK/debootstrap.log"; return 1; }
    # this host's CA certificates (a proxy's CA included), as plain files: the base's own are links into
    # /usr/share (absolute: copied through, they would name the host's files)
    rm -rf "$root/etc/ssl/certs" && cp -rL /etc/ssl/certs "$root/etc/ssl/certs"
    if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$root/etc/pip.conf"; fi
    rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
    tar -C "$root" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$PY_BASE" >/dev/null
    rm -rf "$root"
}

local_bases() {
    python_base
    docker image inspect awqf-local/redis:bookworm >/dev/null 2>&1 || local_build awqf-local/redis:bookworm <<EOF
FROM $PY_BASE
RUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/* \\
    && mkdir /data && printf '%s\n' '#!/bin/sh' \\
    'if [ "\${1#-}" != "\$1" ]; then set -- redis-server "\$@"; fi' \\
    'if [ "\$1" = redis-server ]; then shift; set -- redis-server --protected-mode no "\$@"; fi' \\
    'exec "\$@"' >/entrypoint.sh && chmod +x /entrypoint.sh
WORKDIR /data
ENTRYPOINT ["/entrypoint.sh"]
CMD ["redis-server"]
EOF
    docker image inspect awqf-local/postgres:bookworm >/dev/null 2>&1 || local_build awqf-local/postgres:bookworm <<'EOF'
FROM awqf-local/python:bookworm
RUN mkdir -p /etc/postgresql-common && echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.conf \
    && apt-get update && apt-get install -y --no-install-recommends postgresql-15 && rm -rf /var/lib/apt/lists/*
ENV PGDATA=/var/lib/postgresql/data PATH=/usr/lib/postgresql/15/bin:$PATH
RUN printf '%s\n' '#!/bin/sh' 'set -e' \
    'as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }' \
    'mkdir -p "$PGDATA" /run/postgresql && chown -R postgres:postgres "$PGDATA" /run/postgresql && chmod 700 "$PGDATA"' \
    'if [ ! -s "$PGDATA/PG_VERSION" ]; then' \
    '  printf %s "$POSTGRES_PASSWORD" >/tmp/pw && chown postgres /tmp/pw' \
    '  as_pg initdb -D "$PGDATA" -U "${POSTGRES_USER:-postgres}" --pwfile=/tmp/pw --auth-local=trust --auth-host=scram-sha-256' \
    '  rm /tmp/pw && echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"' \
    '  as_pg pg_ctl -D "$PGDATA" -w -o "-c listen_addresses=" start' \
    '  if [ "${POSTGRES_DB:-postgres}" != postgres ]; then as_pg createdb -U "${POSTGRES_USER:-postgres}" "$POSTGRES_DB"; fi' \
    '  as_pg pg_ctl -D "$PGDATA" -m fast -w stop' \
    'fi' \
    'exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA" -c listen_addresses="*"' \
    >/entrypoint.sh && chmod +x /entrypoint.sh
ENTRYPOINT ["/entrypoint.sh"]
EOF
    docker image inspect awqf-local/s3:moto >/dev/null 2>&1 || local_build awqf-local/s3:moto <<'EOF'
FROM awqf-local/python:bookworm
RUN python -m venv /opt/moto && /opt/moto/bin/pip install --no-cache-dir "moto[server]>=5,<6"
CMD ["/opt/moto/bin/moto_server", "-H", "0.0.0.0", "-p", "9000"]
EOF
}

cat >"$ENV_FILE" <<EOF
POSTGRES_PASSWORD=p@ss:w/rd%check
SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')
S3_ACCESS_KEY_ID=awqforge
S3_SECRET_ACCESS_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
API_PORT=$API_PORT
FLOWER_PORT=${FLOWER_PORT:-15555}
QUEUE_CLASSES=cpu=8GiB,gpu-24g=24GiB,gpu-80g=80GiB
ALLOWED_LOCAL_ROOTS=/models
EOF
# the check's own additions: a volume for the tiny model, seen by the API (config at submit) and the worker
cat >"$OVERRIDE" <<EOF
services:
  api:
    volumes: [api-data:/data, check-models:/models:ro]
  worker-cpu:
    volumes: [worker-scratch:/data, check-models:/models:ro]
volumes:
  check-models:
EOF

API_ARGS=() CPU_ARGS=() CUDA_ARGS=()
if [ "$LOCAL_BASES" = 1 ]; then
    say "no registry: local base images"
    timed "local base images" local_bases
    API_ARGS=(--build-arg "PYTHON_IMAGE=$PY_BASE")
    # (the worker builds name PYTHON_IMAGE too: the requirements stage runs on it)
    CPU_ARGS=("${API_ARGS[@]}" --build-arg "WORKER_BASE=$PY_BASE")
    # no CUDA runtime in this base: the CUDA torch from PyPI brings its own CUDA libraries (pip packages)
    CUDA_ARGS=("${API_ARGS[@]}" --build-arg "WORKER_BASE=$PY_BASE" --build-arg "TORCH_INDEX=https://pypi.org/simple")
    cat >>"$ENV_FILE" <<EOF
PYTHON_IMAGE=$PY_BASE
REDIS_IMAGE=awqf-local/redis:bookworm
POSTGRES_IMAGE=awqf-local/postgres:bookworm
EOF
    python3 - "$OVERRIDE" <<'EOF'
import sys
p = sys.argv[1]
t = open(p).read()
# moto's S3 server in MinIO's place (same port, same credentials accepted), only in this check
t = t.replace("services:\n", """services:
  minio:
    image: awqf-local/s3:moto
    command: ["/opt/moto/bin/moto_server", "-H", "0.0.0.0", "-p", "9000"]
    healthcheck:
      test: ["CMD", "curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9000/moto-api/"]
""", 1)
open(p, "w").write(t)
EOF
    # the CPU torch: a local wheel, served on loopback to the CPU worker build only
    WHEELS=${TORCH_WHEELS:-$(pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | head -1)}
    WHEEL=$(ls "${WHEELS:-/nonexistent}"/torch-*+cpu-cp311-*.whl 2>/dev/null | sort -V | tail -1 || true)
    if [ -n "$WHEEL" ]; then
        TORCH_CPU=$(basename "$WHEEL" | cut -d- -f2)
        mkdir -p "$WORK/wheels" && ln -sf "$WHEEL" "$WORK/wheels/"
        port=${WHEEL_PORT:-18765}  # fixed: the URL is a build argument, a new one would bust the layer cache
        python3 -m http.server --bind 127.0.0.1 --directory "$WORK/wheels" "$port" >"$WORK/wheels.log" 2>&1 &
        WHEEL_PID=$!
        CPU_ARGS+=(--build-arg "TORCH_INDEX=https://pypi.org/simple" --build-arg "TORCH_VERSION=$TORCH_CPU"
            --build-arg "TORCH_FIND_LINKS=http://127.0.0.1:$port/")
        note "CPU torch: $TORCH_CPU from $WHEEL (loopback)"
    else
        CPU_ARGS+=(--build-arg "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    fi
else
    CPU_ARGS=(--build-arg "WORKER_BASE=python:3.11.11-slim-bookworm"
        --build-arg "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
fi
CPU_ARGS+=(--build-arg WITH_TRITON=0)


compose_up() {
    compose up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; return 1; }
    for _ in $(seq 120); do
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q api)" 2>/dev/null)" = healthy ] && return
        sleep 2
    done
    echo "api not healthy"
    return 1
}

build() {  # build TAG TARGET ARGS...
    local tag=$1 target=$2; shift 2
    docker build --network host --target "$target" -t "$tag" "$@" . >"$WORK/build-${tag//[:\/]/-}.log" 2>&1 ||
        { tail -40 "$WORK/build-${tag//[:\/]/-}.log"; return 1; }
}
size() { note "size $1: $(docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1/1e9}')"; }

say "building the API image (target api)"
timed "build awqforge-api:latest" build awqforge-api:latest api "${API_ARGS[@]}"
size awqforge-api:latest
say "building the CPU worker image (target worker, CPU torch)"
timed "build awqforge-worker:cpu" build awqforge-worker:cpu worker "${CPU_ARGS[@]}"
size awqforge-worker:cpu
docker run --rm awqforge-worker:cpu python -c 'import torch, awqforge; print("worker-cpu: torch", torch.__version__)'
docker run --rm awqforge-api:latest python -c '
import importlib.util as u
assert u.find_spec("torch") is None, "torch in the API image"
print("api: no torch")'

say "compose up"
compose config -q
timed "compose up (to api healthy)" compose_up
compose ps
API="http://127.0.0.1:$API_PORT"

say "a tiny random Llama (2 blocks, hidden 128) and a calibration text in the models volume"
docker run --rm -u 0 -e OMP_NUM_THREADS=1 -v "${PROJECT}_check-models:/models" awqforge-worker:cpu python -c '
import shutil
from pathlib import Path
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from awqforge.calibration import BUNDLED_CALIBRATION_TEXT

dest = Path("/models/tiny-llama")
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
LlamaForCausalLM(cfg).save_pretrained(dest)
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train([str(BUNDLED_CALIBRATION_TEXT)], trainers.BpeTrainer(
    vocab_size=512, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                        unk_token="<unk>").save_pretrained(dest)
shutil.copy(BUNDLED_CALIBRATION_TEXT, "/models/calib.txt")
for f in [dest, *dest.iterdir(), Path("/models/calib.txt")]:
    f.chmod(0o755 if f.is_dir() else 0o644)  # written as root (the volume is root-owned), read as uid 1000
print("made", dest)'

say "one job through the API"
KEY=$(compose exec -T api awqforge keys create --tenant check 2>/dev/null | tail -1 | tr -d '\r')
AUTH="Authorization: Bearer $KEY"
BODY='{"model": "/models/tiny-llama", "method": "awq", "bits": 4, "group_size": 32, "n_grid": 4,
       "calibration": {"source": "file:/models/calib.txt", "n_samples": 4, "seq_len": 32},
       "formats": ["awq"], "eval": {"seq_len": 32, "max_seqs": 2}}'
JOB=$(curl -fsS -H "$AUTH" -H 'Content-Type: application/json' -d "$BODY" "$API/v1/jobs" |
    python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["id"], j.get("queue") or "", file=sys.stderr); print(j["id"])')
t0=$(date +%s)
STATUS=queued
for _ in $(seq 300); do
    JOB_JSON=$(curl -fsS -H "$AUTH" "$API/v1/jobs/$JOB")
    STATUS=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["status"])' "$JOB_JSON")
    case $STATUS in succeeded | failed | cancelled) break ;; esac
    sleep 2
done
note "job $JOB: $STATUS after $(($(date +%s) - t0)) s"
python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print({k: j.get(k) for k in ("queue", "stage", "error", "metrics") if j.get(k)})' "$JOB_JSON" | tee -a "$REPORT"
[ "$STATUS" = succeeded ] || { compose logs --no-color --tail 60 worker-cpu api; exit 1; }

say "artifacts through the API (from the object store)"
curl -fsS -H "$AUTH" "$API/v1/jobs/$JOB/artifacts" >"$WORK/artifacts.json"
python3 - "$WORK/artifacts.json" "$API" "$KEY" <<'EOF' | tee -a "$REPORT"
import json, struct, sys, urllib.request
arts, api, key = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
assert arts["count"] >= 1, arts
for a in arts["data"]:
    assert a["files"], a
    for f in a["files"]:
        req = urllib.request.Request(api + f["url"], headers={"Authorization": f"Bearer {key}"})
        body = urllib.request.urlopen(req, timeout=60).read()
        assert len(body) == f["size_bytes"], (f["path"], len(body), f["size_bytes"])
        if f["path"].endswith(".safetensors"):
            n = struct.unpack("<Q", body[:8])[0]
            header = json.loads(body[8 : 8 + n])
            assert any(k.endswith(".qweight") for k in header), "no packed weights"
        via = ""
        if f.get("download_url"):  # signed for S3_PUBLIC_ENDPOINT_URL: the store as this host reaches it
            direct = urllib.request.urlopen(f["download_url"], timeout=60).read()
            assert direct == body, (f["path"], "presigned download differs from the API's")
            via = ", the same bytes from its presigned URL"
        print(f"downloaded {a['format']}/{f['path']}: {len(body)} bytes{via}")
EOF

if [ "$BUILD_CUDA" = 1 ]; then
    say "building the CUDA worker image (target worker, CUDA torch; nothing runs it here: no GPU)"
    timed "build awqforge-worker:cuda" build awqforge-worker:cuda worker "${CUDA_ARGS[@]}"
    size awqforge-worker:cuda
    docker run --rm awqforge-worker:cuda python -c '
import torch
print("worker-cuda: torch", torch.__version__, "CUDA", torch.version.cuda, "GPU visible:", torch.cuda.is_available())
assert torch.version.cuda, "not a CUDA build of torch"' | tee -a "$REPORT"
fi
note "docker-check: OK"
