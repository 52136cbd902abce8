# The two commands a newcomer types, as root, on a fresh Debian/Ubuntu machine:
#   make demo   - set everything up and run the reference post-copy migration under pctop
#   make test   - set everything up and run the test suite
# Both are idempotent; setup only does work when something is missing.

VENV   := .venv
PY     := $(VENV)/bin/python
PCTOP  := $(VENV)/bin/pctop
STAMP  := $(VENV)/.installed

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: setup system demo test lint bench clean

setup: system $(STAMP)
	@$(PCTOP) doctor --fix >/dev/null || true

system:
	@bash scripts/setup-system.sh

# Debian's python3 with --system-site-packages, so Debian's bcc (python3-bpfcc) imports.
$(STAMP): pyproject.toml
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | { grep -v '^WARNING: Location' || true; }
	@touch $@

demo: setup
	$(PCTOP) demo

test: setup lint
	$(PY) -m pytest -q

# ruff (errors, imports, style) and mypy (the typed core: pyproject.toml [tool.mypy]);
# the import layering is a test (tests/unit/test_layers.py).
lint: $(STAMP)
	@$(PY) -m ruff check --quiet pctop tests bench scripts
	@$(PY) -m mypy


# Benchmarks are run by hand (minutes; results go to bench/RESULTS.md by hand).
bench: setup
	$(PY) bench/startup.py
	$(PY) bench/probe_build.py
	$(PY) bench/engine.py
	$(PY) bench/monitor_overhead.py
	$(PY) bench/c_handler_overhead.py
	$(PY) bench/host_overhead.py
	$(PY) bench/latency.py
	$(PY) bench/tui.py

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
