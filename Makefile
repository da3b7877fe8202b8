# Everything runs from the project's own virtualenv; `make setup` installs whatever is missing.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SOURCES := engine log_tools tests bench

.PHONY: setup qemu-tools demo test lint format clean

setup: qemu-tools $(STAMP)

# QEMU's tools do the image work; Graphviz draws `strata-log graph` as SVG or PNG.
qemu-tools:
	@if ! command -v qemu-img >/dev/null || ! command -v qemu-storage-daemon >/dev/null \
		|| ! command -v dot >/dev/null; then \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y \
			qemu-utils qemu-system-common graphviz; \
	fi

$(BIN)/python:
	python3 -m venv $(VENV)

# setup.py builds the C fast paths in place: a change to any of them rebuilds them.
$(STAMP): pyproject.toml setup.py engine/log/_fastscan.c engine/persistence/_fasthook.c | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/python -m engine.demo

test: setup
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/mypy engine log_tools
	$(BIN)/pytest -q
	# The log's tests again on the pure-Python scanner, the reference the compiled one follows.
	$(BIN)/pytest -q --scanner=python tests/log tests/replay tests/log_tools

lint: setup
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/mypy engine log_tools

format: setup
	$(BIN)/ruff format $(SOURCES)
	$(BIN)/ruff check --fix $(SOURCES)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
