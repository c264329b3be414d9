# dcn-inspect: set-up, demo and tests on a fresh machine.
# torch is pinned to the machine's local CPU build here (an unpinned torch pulls a multi-GB
# CUDA build); the package itself only requires torch>=2.1. Override with TORCH_SPEC=...
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
OUT ?= dcn-inspect-out
# The README's pictures: written by `make figures` from the real outputs on the bundled defaults.
EXAMPLES ?= sample_weights/examples
FIGURE_IMAGE ?= dcn_inspect/data/images/scene_00.jpg
FIGURE_STEM := $(basename $(notdir $(FIGURE_IMAGE)))
FIGURES_OUT ?= $(OUT)/figures
# receptive-field: three units (background, a small cross, the large disc) under dcn-sample and its plain dilated baseline.
RF_FIGURE_ARGS := dcn_inspect/data/images/scene_04.jpg --at 8,8 --at 64,232 --at 128,136 --compare-model dcn-sample-dilated

# attention: dcn-attn-sample's encoder trees of two tokens (on the star and on background).
ATTENTION_TREE_ARGS := $(FIGURE_IMAGE) --queries encoder --at 120,170 --at 20,120

.PHONY: setup demo figures test lint ops bench clean readme-tables browser

setup: $(VENV)/.installed

# mmdetection 3.3 + mmengine, the oracle of cli_tests/models/test_mmdet_oracle.py: pure Python,
# installed --no-deps with the few pure-Python modules they import (their declared deps add
# pycocotools, scipy, shapely and opencv-python, which would clash with opencv-python-headless).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "setuptools>=64" wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	$(BIN)/pip install -q --no-deps mmdet==3.3.0 mmengine==0.10.7 \
		yapf==0.43.0 addict termcolor platformdirs
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
	$(BIN)/dcn-inspect offsets --out $(OUT)/offsets
	$(BIN)/dcn-inspect receptive-field $(RF_FIGURE_ARGS) --out $(OUT)/receptive-field
	$(BIN)/dcn-inspect attention --out $(OUT)/attention
	$(BIN)/dcn-inspect explore $(FIGURE_IMAGE) --out $(OUT)/explore
	@echo "demo outputs in $(OUT)/ (open $(OUT)/explore/$(FIGURE_STEM)_explore.html in a browser)"

# Regenerate the README's pictures (never edited by hand): the bundled weights on a bundled
# image with its bundled annotations, and dilation-stats on the bundled demo dataset.
figures: ops
	rm -rf $(FIGURES_OUT)
	$(BIN)/dcn-inspect sample-points $(FIGURE_IMAGE) --out $(FIGURES_OUT)/sample-points
	$(BIN)/dcn-inspect bins $(FIGURE_IMAGE) --out $(FIGURES_OUT)/bins
	$(BIN)/dcn-inspect offsets $(FIGURE_IMAGE) --out $(FIGURES_OUT)/offsets
	$(BIN)/dcn-inspect dilation-stats --out $(FIGURES_OUT)/dilation-stats
	cp $(FIGURES_OUT)/sample-points/$(FIGURE_STEM)_sampling.png $(EXAMPLES)/sample_points.png
	cp $(FIGURES_OUT)/bins/$(FIGURE_STEM)_bins.png $(EXAMPLES)/bins.png
	cp $(FIGURES_OUT)/offsets/$(FIGURE_STEM)_offsets.png $(EXAMPLES)/offsets.png
	cp $(FIGURES_OUT)/dilation-stats/dilation_hist.png $(EXAMPLES)/dilation_hist.png
	$(BIN)/dcn-inspect receptive-field $(RF_FIGURE_ARGS) --out $(FIGURES_OUT)/receptive-field
	cp $(FIGURES_OUT)/receptive-field/scene_04_receptive_field.png $(EXAMPLES)/receptive_field.png
	$(BIN)/dcn-inspect attention $(FIGURE_IMAGE) --out $(FIGURES_OUT)/attention
	cp $(FIGURES_OUT)/attention/$(FIGURE_STEM)_attention.png $(EXAMPLES)/attention.png
	$(BIN)/dcn-inspect attention $(ATTENTION_TREE_ARGS) --out $(FIGURES_OUT)/attention-tree
	cp $(FIGURES_OUT)/attention-tree/$(FIGURE_STEM)_attention_tree.png $(EXAMPLES)/attention_tree.png
	$(BIN)/dcn-inspect receptive-field $(FIGURE_IMAGE) --model dcn-attn-sample --queries decoder --top 4 --out $(FIGURES_OUT)/query-receptive-field
	cp $(FIGURES_OUT)/query-receptive-field/$(FIGURE_STEM)_query_receptive_field.png $(EXAMPLES)/query_receptive_field.png
	$(BIN)/dcn-inspect explore $(FIGURE_IMAGE) --out $(FIGURES_OUT)/explore
	command -v chromium >/dev/null 2>&1 && chromium --headless --disable-gpu --no-sandbox \
		--user-data-dir=$(FIGURES_OUT)/chromium-profile --hide-scrollbars --window-size=1280,900 \
		--virtual-time-budget=3000 --screenshot=$(FIGURES_OUT)/explore/explore.png \
		"file://$(abspath $(FIGURES_OUT))/explore/$(FIGURE_STEM)_explore.html#unit=120,170&levels=1,2,3" \
		2>/dev/null || echo "no chromium: $(EXAMPLES)/explore.png not regenerated"
	-cp $(FIGURES_OUT)/explore/explore.png $(EXAMPLES)/explore.png
	@echo "README pictures written to $(EXAMPLES)/"

# A headless browser for the explorer page's tests (cli_tests/commands/test_explore.py): installed
# when missing and the machine allows it (Debian's chromium, as root); else those tests skip.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		apt-get install -y chromium >/dev/null 2>&1 || \
		(apt-get update -qq >/dev/null 2>&1 && apt-get install -y chromium >/dev/null 2>&1) || \
		echo "chromium not installable here: the browser tests will skip"

# The linter first (pyflakes, pycodestyle at 100 columns, import order; the tree is
# `ruff format`ted), then the whole suite.
test: ops browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider cli_tests

bench: ops
	$(BIN)/python bench/ops.py
	$(BIN)/python bench/tracing.py
	$(BIN)/python bench/tracing.py --cli
	$(BIN)/python bench/dilation_stats.py --threads 1
	$(BIN)/python bench/receptive_field.py --only bundled

# Fix what the linter can fix by itself and format the tree.
lint: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The README's CSV column tables, regenerated from the columns' definitions in the package.
readme-tables: setup
	$(BIN)/python tools/readme_tables.py README.md

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info
