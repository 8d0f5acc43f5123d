# One command to set up and run the demo, one to set up and run the tests.
# `make demo` / `make test` create .venv, install the CPU torch wheel when no NVIDIA GPU is present
# (a plain `torch` requirement would pull several GB of CUDA packages), then the package with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torchvision is pinned beside torch so pip keeps this torch instead of fetching a CUDA build for fastai.
CPU_TORCH ?= torch==2.13.0 torchvision==0.28.0
STAMP := $(VENV)/.installed
# real image data for the benchmarks' tests: Debian's package, installed by `make test` when missing
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# pytest-xdist workers for `make test` (2 cores here: 3.5 min, against about 5.5 serially); each test file stays on one
# worker (--dist loadfile: the browser tests share one JupyterLab, module fixtures run once). 0 runs serially.
TEST_WORKERS ?= 2

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "NVIDIA GPU found: pip picks torch"; \
	else echo "no NVIDIA GPU: installing the CPU torch wheel ($(CPU_TORCH))"; $(PY) -m pip install -q $(CPU_TORCH); fi
	$(PY) -m pip install -q -e ".[test]"
	# Bikeshare data for the tabular notebook and benchmarks; --no-deps skips ISLP's heavy extras
	$(PY) -m pip install -q --no-deps islp==0.6.0
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

demo: $(STAMP)
	$(PY) -m gns_widget demo

test: $(STAMP) $(FASHION_MNIST)
	$(PY) -m ruff check gns_widget tests benchmarks examples
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

# the edit-test loop: every test not marked slow (statistical, end-to-end, browser, notebook, DDP, benchmarks),
# 1 min 51 s on 2 cores (2 min 7 s serially); tests spread one by one (--dist load): without the browser tests no
# module fixture is worth keeping a file on one worker. `make test` stays the whole suite, which CI runs
test-fast: $(STAMP)
	$(PY) -m ruff check gns_widget tests benchmarks examples
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" -n $(TEST_WORKERS) --dist load

$(FASHION_MNIST):
	@command -v apt-get >/dev/null || { echo "the benchmarks' tests need Fashion-MNIST in $@: install Debian's" \
	  "dataset-fashion-mnist package, or copy its four IDX .gz files there"; exit 1; }
	@echo "installing Debian's dataset-fashion-mnist (Fashion-MNIST for the benchmarks' tests)"
	@sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	$$sudo apt-get update -q && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist

lint: $(STAMP)
	$(PY) -m ruff check gns_widget tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info
