# syntax=docker/dockerfile:1
# The REST API: Python slim, the package WITHOUT the engine extra (no torch, no workers/).
# Build from the repository root:  docker build -f docker/api.Dockerfile -t weightsmith-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/weightsmith
# workers/ is left out on purpose: the API never imports it (nor torch through it).
COPY pyproject.toml README.md ./
COPY app ./app
COPY infra ./infra
COPY merging ./merging
COPY schemas ./schemas
COPY service ./service
COPY weightsmith ./weightsmith
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /var/lib/weightsmith weightsmith \
    && mkdir -p /var/lib/weightsmith \
    && chown weightsmith /var/lib/weightsmith

# Run from an empty folder: the installed package is what runs, migrations included.
WORKDIR /var/lib/weightsmith
USER weightsmith
ENV WEIGHTSMITH_DATA_DIR=/var/lib/weightsmith \
    WEIGHTSMITH_LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "--factory", "app.main:create_app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--forwarded-allow-ips", "*"]
