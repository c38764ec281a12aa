# AWQForge images, one file, three targets:
#   docker build --target api -t awqforge-api .                      # slim: no torch, no CUDA
#   docker build --target worker -t awqforge-worker:cuda .           # CUDA runtime base + CUDA torch
#   docker build --target worker -t awqforge-worker:cpu \
#       --build-arg WORKER_BASE=python:3.11.11-slim-bookworm \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu --build-arg WITH_TRITON=0 .
# Dependencies are installed before the source is copied: a source change rebuilds only the last layers.
# Base images are build arguments (pinned by version) so that an air-gapped build can name local ones
# (scripts/docker-check.sh: Debian bases made with debootstrap, torch from a loopback wheel folder).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG WORKER_BASE=nvidia/cuda:13.0.0-runtime-ubuntu22.04

# ---- the dependency list, from pyproject.toml alone --------------------------------------------
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /build
COPY pyproject.toml scripts/requirements.py ./
RUN python requirements.py

# ---- the source, copied last into each image ---------------------------------------------------
FROM scratch AS source
COPY pyproject.toml README.md alembic.ini /src/
COPY migrations /src/migrations
COPY awqforge /src/awqforge
COPY app /src/app
COPY worker /src/worker

# ---- API: slim, no torch -----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH AWQFORGE_HOME=/data
RUN python -m venv /opt/venv
COPY --from=requirements /build/requirements-api.txt /tmp/
# flower: the queue dashboard service in docker-compose.yml runs from this image
RUN pip install -r /tmp/requirements-api.txt "flower==2.0.1"
# installed, then the source removed: a source tree in the working directory would shadow the installed
# package (its awqforge/ has no app/ or worker/: those are installed as app, worker)
COPY --from=source /src /tmp/src
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src \
    && useradd --create-home --uid 1000 awqforge \
    && mkdir -p /data && chown awqforge /data
WORKDIR /data
USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
# migrations are the one-shot `migrate` service's job (docker-compose.yml); `serve` without --no-migrate runs them
CMD ["awqforge", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker", "--no-migrate"]

# ---- worker: torch from TORCH_INDEX, the CPU kernel built into the image -------------------------
FROM ${WORKER_BASE} AS worker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH AWQFORGE_HOME=/data \
    AWQFORGE_EXTENSIONS_DIR=/opt/awqforge/extensions
# the compiler (CPU kernel) and, on the CUDA base, Python: before any build argument, so that changing
# TORCH_INDEX does not reinstall them
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ca-certificates \
    && if ! command -v python3 >/dev/null; then apt-get install -y --no-install-recommends python3 python3-venv python3-dev; fi \
    && if ! python3 -c "import venv, ensurepip" 2>/dev/null; then apt-get install -y --no-install-recommends python3-venv; fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# torch first, from its own index (CUDA or CPU build); TORCH_FIND_LINKS: an extra wheel folder or URL
# (an offline build serves a local wheel there, e.g. TORCH_VERSION=2.13.0+cpu); 2.13 is pyproject's floor
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG TORCH_VERSION=2.13.0
ARG TORCH_FIND_LINKS=""
# hadolint ignore=DL3013
RUN pip install --index-url "$TORCH_INDEX" ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} "torch==${TORCH_VERSION}"
ARG WITH_TRITON=1
COPY --from=requirements /build/requirements-worker.txt /tmp/
RUN pip install -r /tmp/requirements-worker.txt \
    && if [ "$WITH_TRITON" = "1" ]; then pip install "triton>=3.0"; fi
# installed, then the source removed: a source tree in the working directory would shadow the installed
# package (its awqforge/ has no app/ or worker/: those are installed as app, worker)
COPY --from=source /src /tmp/src
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src \
    && awqforge kernels build \
    && { getent passwd 1000 >/dev/null || useradd --create-home --uid 1000 awqforge; } \
    && mkdir -p /data && chown 1000:1000 /data && chmod -R a+rX /opt/awqforge
WORKDIR /data
USER 1000:1000
# alive = this container's worker answers a Celery ping (the node name is set by --name in compose)
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "celery -A worker.celery_app inspect ping -d \"${AWQFORGE_WORKER_NAME:-worker}@$(hostname)\" --timeout 10"]
CMD ["sh", "-c", "exec awqforge worker --name \"${AWQFORGE_WORKER_NAME:-worker}\""]
