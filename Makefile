# One-command set-up: `make demo` brings the platform up and runs its pipeline (`make down` stops it), `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP := $(BIN)/python -m pip install --constraint constraints.txt
# uv installs the rest three times faster than pip; torch goes first through pip, which finds a local wheel where
# the machine has one (uv would not look there), and uv then keeps the torch it finds.
UV_PIP := $(BIN)/uv pip install --python $(BIN)/python --constraint constraints.txt

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT_INSTALL := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends

.PHONY: install tools test demo down bench mlflow-ui clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip uv
	$(PIP) torch
	$(UV_PIP) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Debian's Prometheus: the demo's metrics server, and the tests that scrape Ray's metrics with a real one.
tools:
	@command -v prometheus >/dev/null || $(APT_INSTALL) prometheus || \
		{ $(SUDO) apt-get update && $(APT_INSTALL) prometheus; }

# The tests run in TEST_WORKERS processes (pytest-xdist), each taking whole files (tests/conftest.py groups them),
# so that a module's Ray cluster stays in one process; the stack and cluster modules form one unit that goes first.
# A Ray test waits on process start-ups much of the time: two processes keep two cores busy. TEST_WORKERS=0: one.
TEST_WORKERS ?= 2

test: $(STAMP) tools
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# DEMO_CONFIG: a YAML file of `mlplatform up` settings (StackConfig in platform/mlplatform/stack.py).
demo: $(STAMP)
	@$(MAKE) --no-print-directory tools || echo "prometheus could not be installed; the demo runs without it"
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/mlplatform up $(if $(DEMO_CONFIG),--config $(DEMO_CONFIG))

down: $(STAMP)
	$(BIN)/mlplatform down

bench: $(STAMP)
	$(UV_PIP) -e ".[dev,bench]"
	$(BIN)/python bench/per.py
	$(BIN)/python bench/cartpole.py
	$(BIN)/python bench/apex.py
	$(BIN)/python bench/emotion.py
	$(BIN)/python bench/emotion_quality.py
	$(BIN)/python bench/federated.py
	$(BIN)/python bench/serve.py

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) mlruns mlruns.db* .pytest_cache
