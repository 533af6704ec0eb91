# convsvc with the embedded SQLite store and the echo agent: the same install and command as
# the README's quick start (pip install -c constraints.txt '.[server]', then convsvc serve).
FROM python:3.11-slim

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
