# syntax=docker/dockerfile:1
# The operator image: kopf and the Kubernetes client, no torch.
#   docker build -f images/operator.Dockerfile -t dtj-operator:0.1.0 .
# Pin BASE to a digest when you release (--build-arg BASE=python:3.11-slim-bookworm@sha256:...).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY trainer ./trainer

FROM ${BASE}
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN --mount=from=source,source=/src,target=/src,rw pip install '/src[operator]'
# A passwd entry for uid 1000: getpass.getuser() (kopf's peer identity, torch's
# caches) fails without one; USER also covers a runtime that picks another uid.
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /tmp dtj
ENV USER=dtj
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["dtj"]
CMD ["operator"]
