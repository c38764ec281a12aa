#!/usr/bin/env bash
# Build the API and worker images, bring the compose stack up, run one tiny job through it, tear it down.
#
#   bash scripts/docker-check.sh                 # official base images (a registry is reachable)
#   LOCAL_BASES=1 bash scripts/docker-check.sh   # no registry: the Python and Redis bases made here with
#                                                # debootstrap + docker import (host CA certificates and
#                                                # pip configuration copied in, so pip reaches the index);
#                                                # POSTGRES_IMAGE / MINIO_IMAGE name loaded official images
#
# Starts dockerd itself when none answers (root, Debian's docker.io). Takes minutes and a few GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT=awqf-check
WORK=${WORK:-/tmp/awqf-docker-check}
mkdir -p "$WORK"

if ! docker info >/dev/null 2>&1; then
    echo "starting dockerd (log: $WORK/dockerd.log)"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null
fi

base_image() {  # base_image TAG PACKAGES...: a Debian bookworm root filesystem as a local image
    local tag=$1; shift
    docker image inspect "$tag" >/dev/null 2>&1 && return
    local root="$WORK/rootfs-${tag//[:\/]/-}"
    rm -rf "$root"
    debootstrap --variant=minbase --include="$(IFS=,; echo "$*")" bookworm "$root" http://deb.debian.org/debian
    cp -rL /etc/ssl/certs/. "$root/etc/ssl/certs/"
    [ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
    tar -C "$root" -c . | docker import - "$tag"
    rm -rf "$root"
}

ENV_FILE="$WORK/.env"
cat >"$ENV_FILE" <<EOF
POSTGRES_PASSWORD=p@ss:w/rd%check
SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')
S3_ACCESS_KEY_ID=awqforge
S3_SECRET_ACCESS_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
API_PORT=${API_PORT:-18000}
QUEUE_CLASSES=cpu=8GiB,gpu-24g=24GiB,gpu-80g=80GiB
ALLOWED_LOCAL_ROOTS=/data/models
EOF
if [ -n "${LOCAL_BASES:-}" ]; then
    base_image awqf-base/python:bookworm python3 python3-venv python3-dev python-is-python3 g++ ca-certificates curl
    base_image awqf-base/redis:bookworm redis-server
    cat >>"$ENV_FILE" <<EOF
PYTHON_IMAGE=awqf-base/python:bookworm
REDIS_IMAGE=awqf-base/redis:bookworm
EOF
    # postgres and minio need their images' entrypoints (initdb, server): give local copies of the
    # official images with POSTGRES_IMAGE / MINIO_IMAGE in the environment (docker load) when offline
    for v in POSTGRES_IMAGE MINIO_IMAGE; do [ -n "${!v:-}" ] && echo "$v=${!v}" >>"$ENV_FILE"; done
fi

compose() { docker-compose -p "$PROJECT" --env-file "$ENV_FILE" -f docker-compose.yml "$@"; }
trap 'compose logs --tail 50 >"$WORK/compose.log" 2>&1 || true; compose down -v >/dev/null 2>&1 || true' EXIT

time compose build api worker-cpu
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'awqforge-(api|worker)'
compose up -d
for _ in $(seq 120); do
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q api)" 2>/dev/null)" = healthy ] && break
    sleep 2
done
API="http://127.0.0.1:$(grep ^API_PORT "$ENV_FILE" | cut -d= -f2)"
KEY=$(compose exec -T api awqforge keys create --tenant check | tail -1)
# one tiny job: SmolLM2-135M converted inside the worker image, W4 RTN, no evaluation
MODEL=$(compose exec -T worker-cpu awqforge smollm | tail -1)
JOB=$(curl -fsS -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$MODEL\", \"method\": \"rtn\", \"calibration\": {\"n_samples\": 4, \"seq_len\": 64},
         \"eval\": {\"enabled\": false}, \"device\": \"cpu\"}" "$API/v1/jobs" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
for _ in $(seq 300); do
    STATUS=$(curl -fsS -H "Authorization: Bearer $KEY" "$API/v1/jobs/$JOB" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
    case $STATUS in succeeded|failed|cancelled) break ;; esac
    sleep 2
done
echo "job $JOB: $STATUS"
curl -fsS -H "Authorization: Bearer $KEY" "$API/v1/jobs/$JOB/artifacts" | python3 -m json.tool | head -30
[ "$STATUS" = succeeded ]
