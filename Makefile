# echod: `make run` serves on 127.0.0.1:7007 with the built-in defaults; `make test` runs everything.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint system-deps bench bench-io soak clean

RUN_STAMP := $(VENV)/.run-installed

# `make run` needs only echod and its three dependencies; the test tools come with `make test`.
$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

run: $(RUN_STAMP)
	$(BIN)/echod run

# Debian packages the integration tests drive for real (promtool, prometheus, haproxy, systemd-analyze).
system-deps:
	@sh tests/install-system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench
	$(BIN)/mypy

test: $(STAMP) system-deps lint
	$(BIN)/pytest tests

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $@

# Interleaved A/B rounds of echod against asyncio and uvloop echo servers; see bench/README.md.
bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The Linux IO models measured: thread-per-connection, select, poll, epoll LT/ET and echod vs idle
# connections; see docs/io-models.md.
bench-io: $(BENCH_STAMP)
	$(BIN)/python bench/io_models/run.py $(BENCH_IO_ARGS)

# Soak test (not in CI): 10 minutes of mixed load with reloads, worker SIGKILLs, TTIN/TTOU and one USR2.
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build service/*.egg-info .pytest_cache .ruff_cache
