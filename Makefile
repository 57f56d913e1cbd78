# The two commands: `make demo` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml devcluster/pyproject.toml | sha1sum | cut -c1-12)

.PHONY: bench demo demo-cluster test test-fast install deps controlplane helm prometheus image-builder images lint typecheck unit trainer-test e2e crds cluster-up cluster-down clean

$(STAMP): pyproject.toml devcluster/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing the project and its test tools into $(VENV) (torch is large; pip's cache keeps it)"
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[operator,trainer,dev,bench,examples]' -e ./devcluster
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

## make demo: train examples/quickstart.yaml with 4 local worker processes.
demo: install
	$(VENV)/bin/dtj local examples/quickstart.yaml

## make demo-cluster: the same job through Kubernetes: local cluster with executing
## nodes, the operator, kubectl apply, progress from the job's status, clean-up.
demo-cluster: install controlplane
	$(VENV)/bin/dtj-cluster demo examples/quickstart.yaml

## make controlplane: build (once) the pinned local Kubernetes control plane.
controlplane:
	@bash hack/controlplane/build.sh >/dev/null

## make helm: build (once) the pinned helm from its Go module; the chart tests use it.
helm:
	@bash hack/helm/build.sh >/dev/null

## make prometheus: build (once) the pinned Prometheus from its Go module (a few
## minutes cold, downloads included); the dashboard test runs every Grafana query against it.
prometheus:
	@bash hack/prometheus/build.sh >/dev/null

## make deps: every pinned binary and image tool the tests need, built side by side
## (cold, each build leaves a core idle while it downloads or links: together they
## take about the time of the longest). Cached: instant once built.
deps:
	@$(MAKE) --no-print-directory -j4 controlplane helm prometheus image-builder

## make image-builder: what the image tests build with: hack/images/build.sh installs
## buildah and debootstrap from Debian's packages (apt-get) when missing, and builds
## once a Debian python3 stand-in for the Dockerfiles' base (Docker Hub is out of reach).
image-builder:
	@bash hack/images/build.sh

## make images: the operator and the CUDA trainer image (torch from PyPI: several GB).
## The CPU trainer (`hack/images/build.sh trainer-cpu`) needs download.pytorch.org.
images:
	bash hack/images/build.sh operator trainer-cuda

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint images/*.Dockerfile

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest tests/unit -q

trainer-test: install
	$(PY) -m pytest tests/trainer -q

e2e: install deps
	$(PY) -m pytest tests/e2e -q

## make test-fast: lint, types and the in-process tests (unit, the elastic invariant
## matrix): a few minutes, no control plane, no worker processes.
test-fast: install lint typecheck
	$(PY) -m pytest tests/unit -q -n 2

## make test: lint, type check, unit, real-process trainer tests, e2e on a real control plane.
## Two pytest workers: the e2e tests in one (they share the control plane), the rest in the other.
test: install lint typecheck deps
	$(PY) -m pytest -q -ra --durations=15 -n 2 --dist loadgroup; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

## make bench: the measurements (not run by make test); JSON and PNG in bench/results/.
## Quick settings by default; `make bench FULL=1` runs every seed (about an hour).
bench: install controlplane prometheus
	$(PY) bench/heterogeneity.py $(if $(FULL),--full)
	$(PY) bench/preemption.py
	$(PY) bench/teleportation_scaling.py
	$(PY) bench/gosgd_rate.py
	$(PY) bench/dasgd_heterogeneity.py
	$(PY) bench/many_jobs.py
	$(PY) bench/dashboard.py
	$(PY) bench/user_loop.py
	$(PY) bench/noisy_rounds.py

## make crds: regenerate crds/ and the chart's copy from the API models, and the
## chart's Grafana dashboard from dtj_operator.dashboard.
crds: install
	$(PY) -m dtj_operator.crdgen --write
	$(PY) -m dtj_operator.dashboard --write

cluster-up: install controlplane
	$(VENV)/bin/dtj-cluster up

cluster-down: install
	$(VENV)/bin/dtj-cluster down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
