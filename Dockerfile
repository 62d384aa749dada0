# syntax=docker/dockerfile:1
# One image for both roles: `kubearq operator` and `kubearq worker --settings module:Class`.
# Stage 1 builds the wheel and installs it into a venv (docker/install.sh); stage 2 copies that venv onto a
# clean slim base: no build tools, no pip cache, a numeric non-root user, only /tmp writable.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core/ core/
COPY demo/ demo/
COPY operator/ operator/
COPY worker/ worker/
RUN python -m pip wheel --no-deps --wheel-dir /dist .
COPY docker/install.sh /usr/local/bin/kubearq-install
RUN kubearq-install /dist/kubearq-*.whl /opt/kubearq

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/kubearq/kubearq
LABEL org.opencontainers.image.title="kubearq" \
      org.opencontainers.image.description="ARQ background jobs on Kubernetes: the kubearq operator and workers" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# A named user for the numeric id: libraries that ask for the user name (getpass) find one.
RUN groupadd --gid 65532 kubearq \
 && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kubearq
COPY --from=build /opt/kubearq /opt/kubearq
ENV PATH=/opt/kubearq/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
WORKDIR /tmp
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/opt/kubearq/bin/kubearq"]
CMD ["--help"]
