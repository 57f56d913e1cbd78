# The trainer image: torch and the offline data sets, no kopf.
# For GPUs, start from an image with CUDA-enabled torch (the default wheel is).
# Build from the repository root: docker build -f images/trainer.Dockerfile -t dtj-trainer .
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY trainer ./trainer
RUN pip install --no-cache-dir '.[trainer]' && rm -rf /src
WORKDIR /
USER 1000:1000
ENTRYPOINT []
CMD ["python", "-m", "dtj_trainer"]
