# syntax=docker/dockerfile:1
# jitgate's container image. Build from the repository root:
#   docker build -t jitgate:0.1.0 .
# The config is mounted at /etc/jitgate/jitgate.yaml, the policy in /etc/jitgate/policy/
# (a directory, so that an update is seen and hot-reloaded), keys in /etc/jitgate/keys/.
# jitgate writes only under /var/lib/jitgate (state_dir, the audit spool), so the root
# filesystem can be read-only. Redis is not in the image: the config sets redis.url.
# docs/operations.md walks through it.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# Build stage: a wheel of jitgate, installed with its dependencies into a venv.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m venv /opt/jitgate \
    && /opt/jitgate/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/jitgate/bin/pip install /wheels/*.whl \
    && /opt/jitgate/bin/pip uninstall --yes pip

# Runtime stage: the same Python base, the venv and nothing else (no compilers, no pip cache).
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 jitgate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/jitgate --no-create-home \
        --shell /usr/sbin/nologin jitgate \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/jitgate \
    && install -d -m 0755 /etc/jitgate /etc/jitgate/policy /etc/jitgate/keys
COPY --from=build /opt/jitgate /opt/jitgate
ENV PATH=/opt/jitgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    JITGATE_CONFIG=/etc/jitgate/jitgate.yaml
USER 10001:10001
WORKDIR /var/lib/jitgate
VOLUME ["/var/lib/jitgate"]
EXPOSE 8080
# curl is not in the image: the probe is Python's standard library.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/_jit/healthz', timeout=2)"]
ENTRYPOINT ["jitgate"]
CMD ["serve", "--config", "/etc/jitgate/jitgate.yaml"]
