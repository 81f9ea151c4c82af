# The project's commands. `make run` and `make test` install what they need first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-sqlite test-postgres test-slow test-slow-sqlite test-slow-postgres proto lint bench clean

install: $(STAMP)

# Reinstall when the dependency lists or the protos change. The dashboard's JavaScript comes
# from the npm registry, exactly as ui/package-lock.json pins it (integrity hashes checked).
$(STAMP): pyproject.toml ui/package-lock.json $(wildcard protos/conveyor/v1/*.proto)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@command -v npm >/dev/null || { echo "npm (Node.js) is needed for the dashboard's dependencies"; exit 1; }
	npm ci --prefix ui --ignore-scripts --no-audit --no-fund
	$(MAKE) proto
	touch $(STAMP)

# Generated stubs come from this one command; they are not committed.
proto:
	$(BIN)/python -m grpc_tools.protoc -Iprotos -I$$($(BIN)/python -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))') \
		--python_out=src --pyi_out=src --grpc_python_out=src protos/conveyor/v1/*.proto

run: install
	$(BIN)/conveyor serve

# Lint, then the suite on SQLite and on PostgreSQL (a fresh database per test) side by side:
# each waits on its database and child processes much of the time, so together they take little
# more than the longer one (each one's output is shown whole when it ends). The tests marked
# `slow` (the engine's model tests, SIGKILL and outage fault injection, replicas under load) are
# `make test-slow`, CI's second step, so that `make test` stays well under ten minutes.
test: lint
	$(MAKE) -j2 --output-sync=target test-sqlite test-postgres

test-sqlite: install
	$(BIN)/pytest -m "not slow and not postgresql_only"

test-postgres: install
	CONVEYOR_TEST_DB=postgresql $(BIN)/pytest -m "not slow and not sqlite_only and not client_only and not browser"

test-slow:
	$(MAKE) -j2 --output-sync=target test-slow-sqlite test-slow-postgres

test-slow-sqlite: install
	$(BIN)/pytest -m "slow and not postgresql_only"

test-slow-postgres: install
	CONVEYOR_TEST_DB=postgresql $(BIN)/pytest -m "slow and not sqlite_only and not client_only and not browser"

lint: install
	$(BIN)/buf lint
	$(BIN)/ruff check
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install
	$(BIN)/python bench/trigger.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/list.py
	$(BIN)/python bench/list.py --db postgresql
	$(BIN)/python bench/replicas.py
	$(BIN)/python bench/hostile.py
	$(BIN)/python bench/workers.py
	$(BIN)/python bench/workers.py --http
	$(BIN)/python bench/cli.py
	$(BIN)/python bench/watch.py
	$(BIN)/python bench/soak.py
	$(BIN)/python bench/faults.py

clean:
	rm -rf $(VENV) .conveyor
