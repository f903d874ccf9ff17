# openai-resilience-proxy: the container image.
#
#   docker build -t openai-resilience-proxy .
#   docker run --rm -p 8080:8080 -p 9090:9090 -e PROXY_HOST=0.0.0.0 openai-resilience-proxy
#
# Two stages: `build` installs the package and its dependencies (wheels only, no compiler) into a
# virtualenv; the final stage copies that virtualenv onto a clean base, so no pip cache, build
# backend or installer lands in the image. The base is a build argument so a locally made image
# can stand in for it (scripts/docker-smoke.sh); it must provide python3 with the venv module.
#
# Listeners: traffic on 127.0.0.1:8080 unless configured otherwise (PROXY_HOST=0.0.0.0 or
# `listen.host` in the config): a sidecar keeps 127.0.0.1 so only its pod reaches it, a gateway
# sets 0.0.0.0. Admin (/metrics /healthz /readyz) on 0.0.0.0:9090.
# Config: /etc/openai-resilience-proxy/config.yaml when mounted (read when neither --config nor
# PROXY_CONFIG names another file); built-in defaults otherwise.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ONLY_BINARY=:all: \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
# Dependencies as wheels only (PIP_ONLY_BINARY: nothing is compiled); the project itself is pure
# Python, built by its setuptools backend in an isolated environment that pip discards. pip and
# setuptools then leave the virtualenv: the running image installs nothing.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 openai-proxy \
 && useradd --system --uid 10001 --gid openai-proxy --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin openai-proxy
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
EXPOSE 8080 9090
# Numeric, so Kubernetes can verify runAsNonRoot without a runAsUser.
USER 10001:10001
# Exec form: the proxy is PID 1 and receives SIGTERM itself (readyz turns 503, in-flight requests
# drain for `shutdown_grace`, exit 0).
ENTRYPOINT ["/opt/venv/bin/openai-resilience-proxy"]
