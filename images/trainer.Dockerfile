# syntax=docker/dockerfile:1
# The trainer image: torch and the offline data sets, no kopf. Two variants:
#   docker build -f images/trainer.Dockerfile --target cpu  -t dtj-trainer:0.1.0-cpu .
#   docker build -f images/trainer.Dockerfile --target cuda -t dtj-trainer:0.1.0-cuda .
# cpu takes torch from PyTorch's CPU index (about 1 GB smaller); cuda takes PyPI's
# default wheel, which bundles CUDA and needs only the node's NVIDIA driver (the
# NVIDIA container toolkit mounts it). Both run as uid 1000 (the operator's pods
# ask for runAsNonRoot with that uid). Pin BASE to a digest when you release:
#   docker build --build-arg BASE=python:3.11-slim-bookworm@sha256:<digest> ...
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY trainer ./trainer

FROM ${BASE} AS cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN --mount=from=source,source=/src,target=/src,rw \
    pip install --index-url https://download.pytorch.org/whl/cpu 'torch==2.15.0' \
    && pip install '/src[trainer]'
# A passwd entry for uid 1000: getpass.getuser() (kopf's peer identity, torch's
# caches) fails without one; USER also covers a runtime that picks another uid.
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /tmp dtj
ENV USER=dtj
USER 1000:1000
WORKDIR /tmp
CMD ["python", "-m", "dtj_trainer"]

FROM ${BASE} AS cuda
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN --mount=from=source,source=/src,target=/src,rw pip install '/src[trainer]'
# A passwd entry for uid 1000: getpass.getuser() (kopf's peer identity, torch's
# caches) fails without one; USER also covers a runtime that picks another uid.
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /tmp dtj
ENV USER=dtj
USER 1000:1000
WORKDIR /tmp
CMD ["python", "-m", "dtj_trainer"]
