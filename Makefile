# Everything runs from the project's own virtualenv; `make setup` installs whatever is missing.
# The virtualenv is made from the distribution's CPython: Debian builds it with profile-guided
# and link-time optimisation into a static executable, a tenth faster on the engine's Python
# than a shared-library build such as pyenv's (docs/adr/0012-the-distributions-python.md).
# `make PYTHON=/path/to/python3 ...` uses another one (3.11 or later).
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MADE_BY := $(VENV)/.made-by$(subst /,-,$(PYTHON))
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SOURCES := engine log_tools demo tests bench strata_server

.PHONY: setup qemu-tools python-tools demo test test-pure lint format clean

setup: qemu-tools python-tools $(STAMP)

# QEMU's tools do the image work (qemu-nbd: digests and resumable copies, ADR 0031); Graphviz
# draws `strata-log graph` as SVG or PNG.
qemu-tools:
	@if ! command -v qemu-img >/dev/null || ! command -v qemu-storage-daemon >/dev/null \
		|| ! command -v qemu-nbd >/dev/null || ! command -v dot >/dev/null; then \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y \
			qemu-utils qemu-system-common graphviz; \
	fi

# Debian's python3 needs its venv and headers packages (the C fast paths compile against it).
python-tools:
	@if ! $(PYTHON) -c 'import ensurepip, os, sysconfig, sys; \
		sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
		2>/dev/null; then \
		if [ "$(PYTHON)" != /usr/bin/python3 ]; then \
			echo "$(PYTHON) lacks venv or its headers (Python.h)" >&2; exit 1; \
		fi; \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y \
			python3 python3-venv python3-dev; \
	fi

# A virtualenv made by another interpreter (an older checkout's, or another PYTHON) is made anew.
$(MADE_BY):
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	touch $@

# setup.py builds the C fast paths in place: a change to any of them rebuilds them.
$(STAMP): pyproject.toml setup.py $(wildcard engine/log/csrc/*) $(MADE_BY)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/python -m demo

test: setup
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/mypy engine log_tools demo tests strata_server
	$(BIN)/pytest -q
	$(MAKE) --no-print-directory test-pure

# The log's readers' tests again on a checkout where the C extensions are not built: a copy of
# the tracked and new files (no .so), imported ahead of the editable install by PYTHONPATH, so
# that the pure-Python code the compiled one follows is held to them (docs/adr/0023: the
# directories whose tests read logs in every way: scanning, following, replay, many hosts).
PURE := build/pure
PURE_TESTS := tests/log tests/replay tests/persistence tests/projections tests/log_tools tests/hosts
test-pure: setup
	rm -rf $(PURE) && mkdir -p $(PURE)
	git ls-files -z --cached --others --exclude-standard \
		| tar --null --files-from=- --ignore-failed-read -cf - | tar -xf - -C $(PURE)
	cd $(PURE) && STRATA_NO_EXTENSIONS=1 PYTHONPATH="$(CURDIR)/$(PURE)" \
		"$(CURDIR)/$(BIN)/pytest" -q -p no:cacheprovider $(PURE_TESTS)

lint: setup
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/mypy engine log_tools demo tests strata_server

format: setup
	$(BIN)/ruff format $(SOURCES)
	$(BIN)/ruff check --fix $(SOURCES)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
