# hipcall-ingest: one image for every process (serve, work, reconcile, and the operator commands).
#   docker build -t hipcall-ingest .
#   docker run -p 8080:8080 -e HIPCALL_AMQP_URL=amqp://user:pass@rabbitmq:5672/ hipcall-ingest serve
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# A user of its own: nothing here needs root.
RUN useradd --system --uid 10001 --home-dir /var/lib/hipcall-ingest --create-home hipcall

WORKDIR /app
COPY pyproject.toml README.md ./
COPY ingest ./ingest
COPY workers ./workers
COPY config ./config
RUN pip install --no-cache-dir /app

# The working directory holds the ingress's spool (.spool) and reconcile's ledger (.reconcile): keep
# both on volumes, or a restarted container loses spooled webhooks and the ledger.
USER hipcall
WORKDIR /var/lib/hipcall-ingest
RUN mkdir -p .spool .reconcile
VOLUME ["/var/lib/hipcall-ingest/.spool", "/var/lib/hipcall-ingest/.reconcile"]
ENV HIPCALL_CONFIG=/app/config/hipcall.toml

EXPOSE 8080
# For `serve`; compose turns it off for work and reconcile, which serve no HTTP.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["hipcall-ingest"]
CMD ["serve"]
