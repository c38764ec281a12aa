# AWQForge service image: the API and the workers run from the same image.
#   docker build -t awqforge .                                   (CPU torch)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t awqforge:cuda .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    AWQFORGE_HOME=/data

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/awqforge
# torch first, from the chosen index, so pip does not pull a CUDA build into a CPU image (and vice versa).
RUN pip install --index-url "$TORCH_INDEX" "torch>=2.4"
COPY pyproject.toml README.md ./
COPY awqforge ./awqforge
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY alembic.ini ./
RUN pip install -e .

RUN useradd --create-home --uid 1000 awqforge && mkdir -p /data && chown awqforge /data
# The CPU kernel, compiled once into the image (not into the /data volume, which would hide it).
ENV AWQFORGE_EXTENSIONS_DIR=/opt/awqforge/kernels
RUN awqforge kernels build --optional && chmod -R a+rX /opt/awqforge
USER awqforge
VOLUME ["/data"]
EXPOSE 8000

# `awqforge serve` runs `alembic upgrade head` (after waiting for the database) before the API starts.
CMD ["awqforge", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
