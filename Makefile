# selfsup: `make demo` (set up + SimCLR on Fashion-MNIST + evaluation), `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo lint test test-fast bench clean

setup: $(STAMP)

# torch is pinned through constraints.txt in every install path: an unpinned torch would pull
# several GB of CUDA wheels; 2.13.0 CPU is what the project is tested with.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

# Fashion-MNIST comes from Debian (MIT licence). Without root/apt the demo falls back to the
# digits set bundled with scikit-learn, and the tests that need it are skipped.
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Fashion-MNIST (apt-get install -y dataset-fashion-mnist)"; \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "could not install dataset-fashion-mnist; the demo will use scikit-learn's digits"; \
	else echo "Fashion-MNIST is not installed (needs: apt-get install -y dataset-fashion-mnist as root);" \
	  "the demo will use scikit-learn's digits"; fi

demo: setup data
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  $(BIN)/selfsup pretrain configs/simclr/fashion_mnist.yaml run.name=demo-simclr-fashion-mnist run.overwrite=true $(ARGS); \
	else echo "Fashion-MNIST not found under $(FMNIST): running the demo on scikit-learn's digits"; \
	  $(BIN)/selfsup pretrain configs/simclr/digits.yaml run.name=demo-simclr-digits run.overwrite=true $(ARGS); fi

# Style, types and the layer contract (DESIGN.md): each must report nothing.
lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

test: setup data lint
	$(BIN)/python -m pytest tests

test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow"

bench: setup data
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
