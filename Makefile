# One-command set-up: `make demo` trains the main job on defaults, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP := $(BIN)/python -m pip install --constraint constraints.txt

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT_INSTALL := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends

.PHONY: install tools test demo bench mlflow-ui clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Debian's Prometheus, for the test that scrapes Ray's metrics endpoint with a real server.
tools:
	@command -v prometheus >/dev/null || $(APT_INSTALL) prometheus || \
		{ $(SUDO) apt-get update && $(APT_INSTALL) prometheus; }

test: $(STAMP) tools
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m pytest

demo: $(STAMP)
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/mlplatform train dqn --env CartPole-v1

bench: $(STAMP)
	$(PIP) -e ".[dev,bench]"
	$(BIN)/python bench/per.py
	$(BIN)/python bench/cartpole.py
	$(BIN)/python bench/apex.py
	$(BIN)/python bench/emotion.py
	$(BIN)/python bench/federated.py
	$(BIN)/python bench/serve.py

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) mlruns mlruns.db* .pytest_cache
