# Local Cognito emulator (moto server): issues RS256 tokens and serves a JWKS.
# Dev only; production uses a real Cognito user pool.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "moto[server,cognitoidp]>=5.2" \
    && useradd --create-home --uid 10001 app
USER app
EXPOSE 8009

HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=5 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8009), timeout=2).close()"]

CMD ["python", "-m", "moto.server", "-H", "0.0.0.0", "-p", "8009"]
