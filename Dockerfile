# Two images. `docker build --target worker .` builds an agent worker for OpenHands
# conversations (convworker with openhands-ai, the install scripts/worker makes); a plain
# `docker build .` builds the last stage, convsvc itself.

# -- the agent worker ------------------------------------------------------------------------
FROM python:3.12-slim AS worker
ARG OPENHANDS_VERSION=0.62
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# OpenHands' CLI runtime runs the agent's commands with bash; git for repositories.
RUN apt-get update && apt-get install -y --no-install-recommends bash git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml constraints-openhands-0.41.txt constraints-openhands-0.62.txt README.md ./
COPY src ./src
RUN pip install -c "constraints-openhands-${OPENHANDS_VERSION}.txt" . "openhands-ai==${OPENHANDS_VERSION}.0"
RUN useradd --system --uid 10002 --create-home --home-dir /var/lib/convworker convworker
USER convworker
WORKDIR /var/lib/convworker
# Point it at convsvc with CONVSVC_ADDRESS (and CONVSVC_TOKEN when the server requires one).
ENV CONVSVC_WORKER_WORKSPACE_ROOT=/var/lib/convworker/workspaces \
    LITELLM_LOCAL_MODEL_COST_MAP=True
VOLUME ["/var/lib/convworker/workspaces"]
# SIGTERM stops it: its conversations are killed and convsvc assigns them to other workers.
STOPSIGNAL SIGTERM
ENTRYPOINT ["convworker", "--kind", "openhands"]

# -- convsvc ---------------------------------------------------------------------------------
# convsvc with the embedded SQLite store and the echo agent: the same install and command as
# the README's quick start (pip install -c constraints.txt '.[server]', then convsvc serve).
FROM python:3.11-slim AS server

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN pip install -c constraints.txt '.[server]'

# Run unprivileged; the event log lives on a volume so it outlives the container.
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/convsvc convsvc
USER convsvc
WORKDIR /var/lib/convsvc
ENV CONVSVC_LISTEN=0.0.0.0:50051 \
    CONVSVC_DATA_DIR=/var/lib/convsvc/data
VOLUME ["/var/lib/convsvc/data"]
EXPOSE 50051

HEALTHCHECK --interval=15s --timeout=6s --start-period=10s CMD ["convsvc", "health"]
# SIGTERM (docker stop) drains: health NOT_SERVING, streams end with SHUTTING_DOWN, store flushed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["convsvc", "serve"]
