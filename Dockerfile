# The image of the gRPC server, the email worker and the one-shot migrations (docker-compose.yml picks
# the command). Envoy runs from the official envoyproxy/envoy image instead: the package is installed
# without its `stack` extra (the development stack's Envoy binary and PyYAML).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The sources are only built from: the migrations travel inside the wheel (referral_grpc.migrations),
# so nothing at run time reads this folder, and it is removed after the install.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY referral_grpc ./referral_grpc
COPY migrations ./migrations
RUN pip install . \
    && rm -rf /src \
    && mkdir -p /app \
    && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin referral

# Never root at run time; the image holds no state (PostgreSQL and Redis do) and the process writes
# nothing: /app (made above, as builders differ on creating a WORKDIR) is root-owned and read-only to it
# (tests/test_container.py runs the same way).
WORKDIR /app
USER 10001:10001

ENV ENVIRONMENT=production \
    GRPC_HOST=0.0.0.0 \
    GRPC_PORT=50051 \
    LOG_FORMAT=json
EXPOSE 50051

CMD ["referral-grpc", "serve"]
