# The executor as a base image: ENTRYPOINT for Flyte task pods. See docs/image.md.
#
#   docker build -t executor .                                   # wheels from PyPI
#   docker build --build-arg BASE_IMAGE=my/python:3.11 -t executor .
#   pip wheel '.[all]' -w wheels && docker build -t executor .    # offline: wheels/ in the context
#
# The base needs python3 (>= 3.10) with the venv module; the executor lives in a venv at
# /opt/executor, which is first on PATH, so `pip install` in a derived image installs next to it.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder
ARG EXTRAS=all
ARG EXTRA_PACKAGES=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# .dockerignore lets in only what the wheel needs, plus an optional wheels/ wheelhouse (which must
# hold executor's own wheel too). The wheel is installed by path: PyPI has an unrelated "executor".
COPY . /src
RUN set -eu; \
    python3 -m venv /opt/executor; \
    pip=/opt/executor/bin/pip; \
    extras="${EXTRAS:+[$EXTRAS]}"; \
    if ls /src/wheels/*.whl >/dev/null 2>&1; then \
        echo "installing from the wheelhouse in the build context (--no-index)"; \
        own="$(ls /src/wheels/executor-*.whl 2>/dev/null | sort -V | tail -n 1)"; \
        [ -n "$own" ] || { echo "wheels/ holds no executor-*.whl: pip wheel '.[all]' -w wheels" >&2; exit 1; }; \
        $pip install --no-index --find-links /src/wheels "$own$extras" $EXTRA_PACKAGES; \
    else \
        $pip wheel --no-deps --wheel-dir /tmp/dist /src; \
        $pip install "$(ls /tmp/dist/executor-*.whl)$extras" $EXTRA_PACKAGES; \
    fi; \
    /opt/executor/bin/python -m executor version

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG EXECUTOR_UID=1000
# tini as PID 1 reaps zombies and forwards signals (entrypoint.sh uses it when present).
# auto: install it with apt-get when the base lacks it and apt-get works; no: never.
# The executor user owns /root too: flytekit registers fast tasks with --dest-dir /root, and it is
# the working directory, as in flytekit's own images.
ARG INSTALL_TINI=auto
RUN set -eu; \
    if ! command -v tini >/dev/null 2>&1 && [ "$INSTALL_TINI" != no ] && command -v apt-get >/dev/null 2>&1; then \
        if apt-get update -q && apt-get install -y -q --no-install-recommends tini; then \
            rm -rf /var/lib/apt/lists/*; \
        else \
            echo "WARNING: could not install tini; entrypoint.sh will exec the executor as PID 1" >&2; \
        fi; \
    fi; \
    if command -v useradd >/dev/null 2>&1; then \
        useradd --uid "$EXECUTOR_UID" --user-group --create-home --home-dir /home/executor --shell /bin/bash executor; \
    else \
        echo "executor:x:$EXECUTOR_UID:$EXECUTOR_UID::/home/executor:/bin/sh" >> /etc/passwd; \
        echo "executor:x:$EXECUTOR_UID:" >> /etc/group; \
        mkdir -p /home/executor; \
    fi; \
    mkdir -p /var/cache/executor/bundles; \
    chown -R "$EXECUTOR_UID:$EXECUTOR_UID" /home/executor /var/cache/executor /root

COPY --from=builder /opt/executor /opt/executor
COPY entrypoint.sh /entrypoint.sh
RUN chmod 0755 /entrypoint.sh && /opt/executor/bin/python -m executor version

ENV PATH=/opt/executor/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EXECUTOR_CACHE_DIR=/var/cache/executor/bundles \
    HOME=/home/executor
WORKDIR /root
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER ${EXECUTOR_UID}:${EXECUTOR_UID}
ENTRYPOINT ["/entrypoint.sh"]
CMD ["executor", "--help"]
