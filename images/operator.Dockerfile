# The operator image: kopf and the Kubernetes client, no torch.
# Build from the repository root: docker build -f images/operator.Dockerfile -t dtj-operator .
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY trainer ./trainer
RUN pip install --no-cache-dir '.[operator]' && rm -rf /src
USER 1000:1000
ENTRYPOINT ["dtj"]
CMD ["operator"]
