# syntax=docker/dockerfile:1
# A Celery worker with the merge/edit engine on CUDA (also the image of `weightsmith beat`).
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t weightsmith-worker .
# The host needs the NVIDIA driver and container toolkit; the CUDA libraries come with torch.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python is 3.12 (weightsmith needs 3.11 or later).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, from the CUDA index, so that `.[engine]` finds it satisfied (a cached layer).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/weightsmith
COPY pyproject.toml README.md ./
COPY app ./app
COPY infra ./infra
COPY merging ./merging
COPY schemas ./schemas
COPY service ./service
COPY weightsmith ./weightsmith
COPY workers ./workers
RUN pip install ".[engine]" \
    && useradd --system --uid 10001 --home-dir /var/lib/weightsmith weightsmith \
    && mkdir -p /var/lib/weightsmith/work /var/cache/huggingface \
    && chown -R weightsmith /var/lib/weightsmith /var/cache/huggingface

WORKDIR /var/lib/weightsmith
USER weightsmith
# Downloads and merge outputs are big: keep them on the volumes mounted here, not in /tmp.
ENV WEIGHTSMITH_DATA_DIR=/var/lib/weightsmith \
    WEIGHTSMITH_LOG_FORMAT=json \
    HF_HOME=/var/cache/huggingface \
    TMPDIR=/var/lib/weightsmith/work
CMD ["weightsmith", "worker", "--queues", "gpu,default"]
