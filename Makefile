# The verbs people type. `make demo` and `make test` set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint fmt bench chaos services clean client

# The TypeScript client: npm packages (when missing) and its build check.
client:
	@scripts/client.sh

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

services: $(STAMP)
	@scripts/services.sh

# Private Redis/PostgreSQL servers started for the demo are stopped when it ends.
demo: $(STAMP) services
	@trap 'scripts/services.sh stop' EXIT; $(BIN)/dispatch demo

# Most tests wait on real processes and servers, not on the CPU: three pytest workers
# (whole modules each, so module fixtures stay shared) keep the suite well under 15 min.
# The security suite runs first and alone: its rate-limit and ack-timeout assertions need
# the clients to get the CPU they ask for.
TEST_WORKERS ?= 3
test: $(STAMP) services
	@scripts/browser.sh
	@scripts/test-tools.sh
	@scripts/promtool.sh
	@scripts/client.sh
	@trap 'scripts/services.sh stop' EXIT; status=0; \
	$(BIN)/pytest -q tests/security || status=1; \
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --ignore=tests/security || status=1; \
	exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) services
	$(BIN)/python -m bench

# A randomized fault soak on loopback (CHAOS_SECONDS, default 1800); prints the invariant report.
CHAOS_SECONDS ?= 1800
chaos: $(STAMP) services
	@trap 'scripts/services.sh stop' EXIT; status=0; \
	DISPATCH_FAULTS_MACHINE=1 $(BIN)/pytest -q tests/faults/test_faults_machine.py || status=1; \
	CHAOS_SECONDS=$(CHAOS_SECONDS) $(BIN)/python tests/faults/chaos.py || status=1; \
	exit $$status

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
