# faceflow: `make run` runs the pipeline, `make ui` serves the Prefect UI, `make test` runs the tests,
# `make bench` measures.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Prefect keeps its database and cached task results under PREFECT_HOME; by default that
# is this checkout's .prefect/ so runs never mix with another project's.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT ?= false

.PHONY: install system-packages run ui test test-fast rehearsal screenshots bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/faceflow run $(ARGS)

# The Prefect UI on http://127.0.0.1:4200 (PORT=...; HOST=0.0.0.0 only with an auth string, docs/operations.md)
# with the deployments and a worker; Ctrl-C stops it.
PORT ?= 4200
HOST ?= 127.0.0.1
ui: $(STAMP)
	$(BIN)/faceflow ui --host $(HOST) --port $(PORT)

# Tests open the Prefect UI in Debian's Chromium (driven by Playwright) and run a Prefect
# server on a throwaway PostgreSQL cluster (Debian's postgresql: initdb, pg_ctl); both are
# installed with apt-get when missing. Cache-lock tests start a redis-server of their own (Debian's
# redis-server, tests/services.py): the system service its installation may start is stopped.
system-packages:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; fi; \
	case "$$missing" in *redis-server*) service redis-server stop >/dev/null 2>&1 || true;; esac

# pytest-xdist runs whole modules side by side (--dist loadscope), longest first (tests/conftest.py's
# LONGEST_FIRST; --no-loadscope-reorder keeps that order): most modules wait on servers and
# subprocesses rather than compute, so 3 workers fit 2 cores. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 3
XDIST = -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder
test: $(STAMP) system-packages
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# For development: everything but the browser walk and the several-machine rehearsal (`make test` and CI
# run those too).
FAST_SKIP = --ignore=tests/test_rehearsal.py --ignore=tests/test_ui_walk.py
test-fast: $(STAMP) system-packages
	$(BIN)/python -m pytest $(XDIST) $(FAST_SKIP) $(PYTEST_ARGS)

# The several-machine set-up of docs/operations.md on this machine (PostgreSQL, Redis, Dask, two
# workers), checked, with its figures printed; also part of `make test`.
rehearsal: $(STAMP) system-packages
	$(BIN)/python -m pytest tests/test_rehearsal.py -p no:randomly -s $(PYTEST_ARGS)

# docs/ui/*.png: the browser test's screenshots of a walk through the UI (docs/ui.md).
screenshots: $(STAMP) system-packages
	FACEFLOW_SCREENSHOTS=$(CURDIR)/docs/ui $(BIN)/python -m pytest tests/test_ui_walk.py

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .prefect outputs bench/results
