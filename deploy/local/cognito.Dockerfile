# Local Cognito emulator (moto server): a user pool, an app client and the dev user, made at
# every start (ragctl/emulator.py); issues RS256 tokens and serves the pool's JWKS.
# Development only: production uses a real Cognito user pool.
# Build from the repository root: docker build -f deploy/local/cognito.Dockerfile .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install "moto[server,cognitoidp]>=5.2" "boto3>=1.34" "httpx>=0.27" \
    && /opt/venv/bin/python -m pip uninstall -y pip setuptools \
    && find /opt/venv -depth -type d -name tests -path '*/site-packages/*' -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
RUN useradd --create-home --uid 10001 app \
    && mkdir -p /var/lib/cognito /run/cognito \
    && chown app:app /var/lib/cognito /run/cognito
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY ragctl/__init__.py ragctl/cognito.py ragctl/emulator.py ragctl/
COPY services/__init__.py services/
COPY services/common/__init__.py services/common/dev_secrets.py services/common/

ENV COGNITO_HOST=0.0.0.0 \
    COGNITO_PORT=8009 \
    COGNITO_PUBLIC_URL=http://cognito:8009 \
    COGNITO_STATE_DIR=/var/lib/cognito \
    COGNITO_POOL_FILE=/run/cognito/pool.json
EXPOSE 8009
USER app

HEALTHCHECK --interval=5s --timeout=4s --start-period=20s --retries=5 \
    CMD ["python", "-m", "ragctl.emulator", "check"]

CMD ["python", "-m", "ragctl.emulator", "serve"]
