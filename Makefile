# One-command set-up: `make demo` or `make test` create .venv, install the pinned dependencies and run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export ANOMALY_WORKSPACE ?= $(CURDIR)/workspace

.PHONY: install demo test test-fast lint lock clean bench bench-quick serve stop status browser

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed: run make PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev]"
	@touch $@

demo: install  ## Write the tutorial's data, retrain, score one night; ends with a JSON summary line.
	$(BIN)/anomaly demo --workspace "$(ANOMALY_WORKSPACE)"

test: install  ## Every test, slow ones included.
	$(BIN)/python -m pytest

test-fast: install  ## Unit tests only.
	$(BIN)/python -m pytest -m "not slow"

bench: install  ## Benchmarks side by side (about 75 minutes on 2 cores, 45 of them the ADBench section); writes bench/results/latest.{json,md}.
	$(BIN)/python -m bench.run

bench-quick: install  ## Smoke run of the benchmarks on small sizes; writes bench/results/quick.{json,md}.
	$(BIN)/python -m bench.run --quick

serve: install  ## PostgreSQL, the Prefect server (127.0.0.1, port ANOMALY_PREFECT_PORT or 4200), work pool, deployments and worker, in the background.
	VENV="$(VENV)" scripts/stack.sh serve

stop: install  ## Stop exactly the processes `make serve` started.
	VENV="$(VENV)" scripts/stack.sh stop

status: install  ## Whether PostgreSQL, the server and the worker run, and the deployments the API holds.
	VENV="$(VENV)" scripts/stack.sh status

browser: install  ## Browser check of the Prefect UI (tests/test_ui.py); installs Debian's chromium first if it is missing.
	scripts/install-chromium.sh
	$(BIN)/python -m pytest -q tests/test_ui.py

lint: install
	$(BIN)/ruff check .

lock:  ## Re-pin every dependency from a fresh resolve (review the diff).
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -e ".[dev]"
	.lock-venv/bin/pip freeze --exclude-editable | grep -v '^-e' > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
