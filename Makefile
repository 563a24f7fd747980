# Two commands do all set-up on a fresh machine (a virtual environment in .venv with the pinned stack):
#   make demo      runs the main example (flags: make demo ARGS="--pretrained DIR")
#   make test      runs the fast test tier (at most 5 minutes on 2 cores)
#   make test-all  runs every test (what CI runs: .ci/run, after make lint)
#   make lint      checks the code with ruff (configured in pyproject.toml)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nsa-layers-installed

.PHONY: setup demo test test-all lint bench bench-attention bench-decode bench-unit clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "mindspore==2.9.0" -e ".[mindformers,examples,test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/finetune_nsa.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/bench_compress.py

bench-attention: $(STAMP)
	$(PY) bench/bench_attention.py

bench-decode: $(STAMP)
	$(PY) bench/bench_decode.py

bench-unit: $(STAMP)
	$(PY) bench/bench_unit.py

clean:
	rm -rf $(VENV) output
