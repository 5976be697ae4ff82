# K2 — every target installs what it needs first (see README).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export K2_HOME ?= $(CURDIR)/.k2

.PHONY: install system-deps run test dev lint bench clean

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip uv

$(VENV)/.installed: pyproject.toml | $(BIN)/uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e ".[dev]"
	touch $@

install: $(VENV)/.installed ## create the virtualenv and install K2 with its dev tools

# Debian's Chromium for the browser test (Playwright drives it; it never downloads a browser).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "WARNING: could not install chromium; the browser test will be skipped"; }

run: install ## run the whole pipeline end to end on the embedded default
	$(BIN)/k2 run

test: install system-deps ## run the test suite against real parts
	$(BIN)/pytest -q

dev: install ## dagster dev on 127.0.0.1 with the dev stack up and the simulator streaming
	$(BIN)/k2 dev

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	-$(BIN)/k2 devstack down
	rm -rf .k2
