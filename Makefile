# dcn-inspect: set-up, demo and tests on a fresh machine.
# torch is pinned to the machine's local CPU build here (an unpinned torch pulls a multi-GB
# CUDA build); the package itself only requires torch>=2.1. Override with TORCH_SPEC=...
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
OUT ?= dcn-inspect-out

.PHONY: setup demo test ops bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "setuptools>=64" wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $@

# Build (or load from cache) the native ops and show what is active.
ops: setup
	$(BIN)/dcn-inspect doctor

# The main job on the bundled defaults: sample weights, bundled images and dataset.
demo: ops
	$(BIN)/dcn-inspect models
	$(BIN)/dcn-inspect sample-points --out $(OUT)/sample-points
	$(BIN)/dcn-inspect dilation-stats --out $(OUT)/dilation-stats
	$(BIN)/dcn-inspect bins --out $(OUT)/bins
	@echo "demo outputs in $(OUT)/"

test: ops
	$(BIN)/python -m pytest -q -p no:cacheprovider cli_tests

bench: ops
	$(BIN)/python bench/ops.py
	$(BIN)/python bench/tracing.py
	$(BIN)/python bench/tracing.py --cli
	$(BIN)/python bench/dilation_stats.py --threads 1

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info
