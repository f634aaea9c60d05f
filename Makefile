# echod: `make run` serves on 127.0.0.1:7007 with the built-in defaults; `make test` runs everything.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The compiled build (README "Building"): a non-editable install, as deploy/install.sh makes it, with
# the data path compiled by mypyc. It is rebuilt whenever the source changes, so it is never stale.
CVENV  ?= .venv-compiled
CBIN   := $(CVENV)/bin
CSTAMP := $(CVENV)/.installed
SOURCES := pyproject.toml setup.py $(shell find service -name '*.py' -not -path '*/__pycache__/*')
# The integration tests `make test` also runs on the interpreted build.
INTERPRETED_TESTS ?= tests/test_build.py tests/test_echo.py tests/test_lifecycle.py tests/test_reliability.py
# Test processes (pytest-xdist): the tests mostly wait on the daemon, so 4 on CI's 2 cores cut the
# suite from about 14 to about 5 minutes (tests/conftest.py, "parallel runs"). TEST_JOBS=0: one process.
# Tests marked `exclusive` (timing between pinned processes) run afterwards, alone.
TEST_JOBS ?= 4

.PHONY: run run-compiled test lint system-deps bench bench-io soak clean

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

# ECHOD_COMPILE=1: no compiler is an error here, not a quiet interpreted build (setup.py).
$(CSTAMP): $(SOURCES)
	$(PYTHON) -m venv $(CVENV)
	ECHOD_COMPILE=1 $(CBIN)/pip install --quiet --disable-pip-version-check '.[test]'
	touch $@

run: $(RUN_STAMP)
	$(BIN)/echod run

run-compiled: $(CSTAMP)
	$(CBIN)/echod run

# Debian packages the integration tests drive for real (promtool, prometheus, haproxy, systemd-analyze).
system-deps:
	@sh tests/install-system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check service tests bench setup.py
	$(BIN)/ruff format --check service tests bench setup.py
	$(BIN)/mypy

# The whole suite on the compiled build (what deploy/install.sh installs), then the daemon's
# integration tests on the interpreted one (the editable .venv): the tests spawn sys.executable.
test: $(STAMP) $(CSTAMP) system-deps lint
	EXPECT_ECHOD_BUILD=compiled $(CBIN)/pytest -n $(TEST_JOBS) -m "not exclusive" tests
	EXPECT_ECHOD_BUILD=compiled $(CBIN)/pytest -m exclusive tests
	EXPECT_ECHOD_BUILD=interpreted $(BIN)/pytest -n $(TEST_JOBS) -m "not exclusive" $(INTERPRETED_TESTS)
	EXPECT_ECHOD_BUILD=interpreted $(BIN)/pytest -m exclusive $(INTERPRETED_TESTS) || [ $$? -eq 5 ]  # 5: none there

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $@

# Interleaved A/B rounds of echod against asyncio and uvloop echo servers; see bench/README.md.
bench: $(BENCH_STAMP) $(CSTAMP)
	$(BIN)/python bench/run.py --compiled-python $(CBIN)/python $(BENCH_ARGS)

# The Linux IO models measured: thread-per-connection, select, poll, epoll LT/ET and echod vs idle
# connections; see docs/io-models.md.
bench-io: $(BENCH_STAMP)
	$(BIN)/python bench/io_models/run.py $(BENCH_IO_ARGS)

# Soak test (not in CI): 10 minutes of mixed load with reloads, worker SIGKILLs, TTIN/TTOU and one USR2.
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(CVENV) build service/*.egg-info .pytest_cache .ruff_cache
