# Two entry points: `make demo` and `make test`. Both build the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: venv demo test bench clean

# what a user needs to predict
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $(STAMP)

# everything the test suite exercises (training extras included)
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[test,train,serve]"
	touch $(TEST_STAMP)

venv: $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/canopy demo -o demo_out/ --overwrite

test: $(TEST_STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q tests/

bench: $(TEST_STAMP)
	$(BIN)/python benchmarks/engine_vs_reference.py --size 2048 --engine int8 --cli default bf16

clean:
	rm -rf $(VENV) demo_out .pytest_cache
