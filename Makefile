# The two commands of the README: `make demo` and `make test`. Both create .venv from the pins when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
BUILD := $(CURDIR)/build
STAMP := $(VENV)/.aimkp-installed

# The venv's bin first (llamafactory-cli, torchrun and aimkp are called by name); caches stay in build/.
export PATH := $(VENV)/bin:$(PATH)
export HF_HOME := $(BUILD)/cache/huggingface
export HF_DATASETS_CACHE := $(BUILD)/cache/datasets
export MPLCONFIGDIR := $(BUILD)/cache/matplotlib
export NLTK_DATA := $(BUILD)/cache/nltk
export TORCH_EXTENSIONS_DIR := $(BUILD)/cache/torch_extensions
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: setup browser demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade "pip==26.3"
	DS_BUILD_OPS=0 $(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,deepspeed,qlora]"
	touch $@

demo: setup
	aimkp models tiny --out $(BUILD)/tiny --name llava
	aimkp data demo --out data/demo
	llamafactory-cli train recipes/demo/demo_llava_train.yaml
	llamafactory-cli train recipes/demo/demo_llava_predict.yaml
	@echo
	@echo "Adapter:     $(BUILD)/demo/llava-lora"
	@echo "Curriculum:  $(BUILD)/demo/llava-lora/aimkp_state.json, plot $(BUILD)/demo/llava-lora/training_aimkp_curriculum.png"
	@echo "Predictions: $(BUILD)/demo/llava-lora/predict/generated_predictions.jsonl"

# Debian's headless-capable Chromium for the web UI test (driven by the playwright package; never `playwright install`).
browser:
	@test -x /usr/bin/chromium || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

test: setup browser
	ruff check . && ruff format --check .
	python -m pytest

# The unit layer only: no llamafactory-cli, torchrun or browser runs, nothing slow (tests marked e2e are left out).
test-fast: setup
	python -m pytest -m "not e2e"

lint: setup
	ruff check . && ruff format --check .

clean:
	rm -rf $(BUILD) data/demo
