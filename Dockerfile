# syntax=docker/dockerfile:1
# authopt on CPU: `docker build -t authopt:0.1.0 .` (the GPU image is Dockerfile.cuda).
# One image, two entry points: `authopt serve` (the default) and `authopt worker`.

# Pinned: a patch release of Python 3.11 on Debian 12 (pin the digest too, @sha256:…, when you mirror it).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/authopt
ENV PATH=/opt/authopt/bin:$PATH
# torch first, and the CPU build: an open requirement would fetch the multi-GB CUDA build. The same
# pin as scripts/setup and pyproject.toml (torch>=2.13.0,<2.14). TORCH_INDEX_URL empty: pip's own
# configuration decides (scripts/build-images mounts the machine's, whose wheels hold the CPU build).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# DL3013: torch is pinned; hadolint takes the "$@" (the index option, or nothing) for a package.
# hadolint ignore=DL3013
RUN if [ -n "$TORCH_INDEX_URL" ]; then set -- --index-url "$TORCH_INDEX_URL"; fi \
    && pip install "$@" "torch==2.13.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY authopt ./authopt
COPY server ./server
COPY streams ./streams
COPY model ./model
COPY history ./history
COPY sim ./sim
COPY cli ./cli
# Not editable: the packages and the bundled default model (model/artifacts) land in the venv,
# compiled to bytecode by pip (the read-only root filesystem never needs to write any). pip and
# setuptools go afterwards: nothing installs at run time.
# The rocksdb extra lets the same image run workers on the RocksDB store; the local (broker
# binary) and eval (plots) extras stay out: Kubernetes points at a real Kafka.
# DL3013 (pin versions) does not apply: this is the project itself, whose dependencies' ranges are
# in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[rocksdb]" \
    && pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
# A fixed non-root uid/gid: the Helm chart's securityContext runs as 10001 too.
RUN groupadd --system --gid 10001 authopt \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin authopt
COPY --from=build /opt/authopt /opt/authopt
# HOME=/tmp: the root filesystem is read-only in the chart; /tmp is its emptyDir.
ENV PATH=/opt/authopt/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    AUTHOPT_SERVER_HOST=0.0.0.0
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051
ENTRYPOINT ["authopt"]
CMD ["serve"]
