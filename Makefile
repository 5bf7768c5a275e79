# edgefleet: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# `make test`: the suite on TEST_WORKERS pytest-xdist workers (each with its own broker, ports,
# temp dirs and PostgreSQL database), then the tests marked `serial` (they need a quiet machine)
# on their own. Both steps always run; the target fails if either did. One worker more than
# cores: the suite's tests spend most of their wall time waiting on brokers, servers and
# subprocesses (docs/decisions/0018), so a third worker on two cores fills those waits.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 1 )))
PYTEST_PARALLEL ?= -n $(TEST_WORKERS) --dist loadgroup -m "not serial"

.PHONY: demo test test-arm64 bench lint fmt typecheck clean venv models

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgefleet demo

test: $(STAMP)
	status=0; \
	$(PY) -m pytest -q $(PYTEST_PARALLEL) $(PYTEST_ARGS) || status=$$?; \
	$(PY) -m pytest -q -m serial $(PYTEST_ARGS) || status=$$((status ? status : $$?)); \
	exit $$status

# The agent on an arm64 userland under qemu (root; builds or reuses the cached rootfs; exit 77 with
# the reason where it cannot run). See docs/agent.md, "The aarch64 lane".
# `make test-arm64`: the aarch64 lane under qemu (docs/agent.md). Where it cannot run (no root,
# no binfmt_misc) it says why and skips (exit 77 from the script becomes success here).
test-arm64: $(STAMP)
	$(PY) scripts/arm64_lane.py $(ARM64_ARGS) || { rc=$$?; [ $$rc -eq 77 ] || exit $$rc; echo "arm64 lane skipped"; }

models: $(STAMP)
	$(PY) scripts/fetch_models.py

bench: $(STAMP)
	$(PY) -m bench $(BENCH)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy signing compiler device_agent fleet_server simulator edgefleet bench

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
