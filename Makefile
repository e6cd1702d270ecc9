PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test pyz bench bench-store stress demo clean venv hunt install

test: $(STAMP)
	$(VENV_PY) tests/run_parallel.py $(PYTEST_ARGS)

venv: $(STAMP)

# Re-install whenever requirements-dev.txt changes.
$(STAMP): requirements-dev.txt
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

pyz:
	$(PYTHON) build_zipapp.py

# A `ccsync` command in ~/.local/bin (or $$XDG_BIN_HOME) that runs dist/ccsync.pyz.
install: pyz
	$(PYTHON) dist/ccsync.pyz install

# The real server process, the pyz and loopback HTTP (bench/bench_real.py --help).
BENCH_ARGS ?= --rows 100000
bench: $(STAMP)
	$(VENV_PY) bench/bench_real.py $(BENCH_ARGS)

# The store alone, in one process (for profiling the merge core).
bench-store: $(STAMP)
	$(VENV_PY) bench/bench_sync.py

# Model-based hunt: 10,000 fresh random programs judged by the oracle (tests/model_sim.py),
# then the long forms of the fuzz, property and collection property tests with fresh seeds
# (CI runs short forms).
hunt: $(STAMP)
	$(VENV_PY) bench/hunt.py --count 10000
	CCSYNC_FUZZ_EXAMPLES=3000 CCSYNC_PROPERTY_EXAMPLES=1000 CCSYNC_COLLECT_EXAMPLES=500 \
		$(VENV_PY) -m pytest -q tests/test_fuzz_records.py tests/test_property.py \
		tests/test_collect_property.py tests/test_columnar_batch.py

# Long forms: cc's writer during 100,000-row syncs, then the attacks on the server
# (floods of 1,000 sockets, junk connections, oversized heads, deadlines, 50 clients
# for 60 s with /health polled, 10,000 hostile HTTP cases, kill -9 of client and server
# in 30 large first syncs, the fault proxy's refused, reset, stalled and cut connections).
stress: $(STAMP)
	$(VENV_PY) bench/stress_lockout.py --rows 100000 --modes delete,wal
	$(VENV_PY) -m pytest -q -s tests/stress_server_door.py tests/stress_server_junk.py \
		tests/stress_server_memory.py tests/stress_server_deadlines.py \
		tests/stress_clients.py tests/stress_hostile.py tests/stress_kill9.py \
		tests/stress_faults.py
	CCSYNC_BIG_ROWS=100000 $(VENV_PY) -m pytest -q tests/test_transport.py -k big_first_sync
	CCSYNC_SMALL_BATCH_SEEDS=30 $(VENV_PY) -m pytest -q tests/test_small_batches.py

demo: $(STAMP)
	$(VENV_PY) ccsync.py demo

clean:
	rm -rf dist $(VENV) .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
