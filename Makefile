# Two entry points on a fresh machine: `make run` (the whole pipeline on the embedded default) and `make test`.
# Both create .venv on first use. TORCH picks the torch build: the default is the CPU-only build this project is
# tested with; on a GPU machine use e.g. `make run TORCH=torch` (a CUDA build) or install torch into .venv yourself.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CORES ?= 2

.PHONY: run test clean

run: $(VENV)/.installed
	$(VENV)/bin/snakemake --cores $(CORES) all

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

# torch first and pinned: a plain `torch` requirement can pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

clean:
	rm -rf results resources .snakemake
