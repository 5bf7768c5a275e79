# edgefleet: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# `make test`: the suite on TEST_WORKERS pytest-xdist workers (each with its own broker, ports,
# temp dirs and PostgreSQL database), then the tests marked `serial` (they need a quiet machine)
# on their own. Both steps always run; the target fails if either did. Two workers per core:
# the suite's tests spend most of their wall time waiting on brokers, servers and subprocesses
# (docs/decisions/0018). On the 2-core VM, one run each: 3 workers 521 s, 4 workers 456 s, 6
# workers 470 s (six stretch every CPU-heavy test three-fold; docs/benchmarks.md). At most 16:
# each worker has its own broker, PostgreSQL database and servers with connection pools.
TEST_WORKERS ?= $(shell n=$$(( $$(nproc 2>/dev/null || echo 1) * 2 )); echo $$(( n > 16 ? 16 : n )))
PYTEST_PARALLEL ?= -n $(TEST_WORKERS) --dist loadgroup -m "not serial"
# Byte-code caches on, whatever the caller's PYTHONDONTWRITEBYTECODE: the suite and the demo start
# hundreds of Python processes (workers, servers, CLIs, agents), and with it set each one compiles
# everything it imports again and every worker rewrites every test module's asserts. Each module
# is compiled by the first process that imports it, into the clone's or the venv's __pycache__
# (git ignores them).
unexport PYTHONDONTWRITEBYTECODE
PYTEST := $(PY) -m pytest

.PHONY: demo test test-arm64 bench lint fmt typecheck clean venv models

# uv (from PyPI, into the venv) resolves and installs in parallel. Nothing is byte-compiled ahead:
# the venv holds ~14,300 modules and the suite's collection imports ~3,400 of them, so compiling
# each module when a process first imports it (the cache is kept) costs ~10 CPU-s where compiling
# them all cost ~28 (docs/benchmarks.md). uv reads no pip configuration: the system's CA store
# (--native-tls, where pip's PIP_CERT points) and PIP_FIND_LINKS are handed to it. Where uv cannot
# be had or fails, pip does it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	{ $(PY) -m pip install -q 'uv>=0.5' && \
	  $${PIP_FIND_LINKS:+env UV_FIND_LINKS="$$PIP_FIND_LINKS"} \
	  $(PY) -m uv pip install -q --native-tls --python $(PY) -e '.[all]'; } || { \
	  $(PY) -m pip install -q --upgrade pip && \
	  $(PY) -m pip install -q --no-compile -e '.[all]'; }
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgefleet demo

# The real models are fetched once before the workers start (each worker would fetch them at
# the same time); a failure here is left to the tests that need them to report or skip.
test: $(STAMP)
	$(PY) scripts/fetch_models.py >/dev/null 2>&1 || true
	status=0; \
	$(PYTEST) -q $(PYTEST_PARALLEL) $(PYTEST_ARGS) || status=$$?; \
	$(PYTEST) -q -m serial $(PYTEST_ARGS) || status=$$((status ? status : $$?)); \
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
