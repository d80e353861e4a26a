# The two commands of the README: `make demo` and `make test`. Both create .venv from the pins when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
BUILD := $(CURDIR)/build
STAMP := $(VENV)/.aimkp-installed
# The compatibility job (`make test-compat`): LLaMA-Factory main, from the vendored snapshot, in build/venv-main.
SHARED ?= $(or $(AIMKP_SHARED_DIR),$(CURDIR)/../shared)
LLAMAFACTORY_MAIN ?= $(SHARED)/vendor/llamafactory-main-ff6d4d12.tar.gz
COMPAT_VENV := $(BUILD)/venv-main
COMPAT_STAMP := $(COMPAT_VENV)/.aimkp-installed
# The stamp holds the checkout whose plugin the venv's editable install points at; another checkout sharing build/
# rebuilds it.
COMPAT_REBUILD := $(if $(filter $(CURDIR),$(shell cat $(COMPAT_STAMP) 2>/dev/null)),,FORCE)

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

.PHONY: setup setup-compat browser demo test test-fast test-compat lint clean FORCE

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade "pip==26.3"
	DS_BUILD_OPS=0 $(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,deepspeed,qlora]"
	touch $@

# A second venv for LLaMA-Factory main that reinstalls only what main needs at other versions (constraints-main.txt:
# llamafactory from the snapshot, transformers); torch, DeepSpeed and every other package come from .venv through a
# path file that appends its site-packages (a plain path line: .venv's own .pth files, its editable install of the
# plugin among them, are not run). --ignore-installed: pip sees .venv's packages too and must not remove them.
# torchrun is called by name (FORCE_TORCHRUN), so the venv gets its own, which runs this venv's Python.
setup-compat: $(COMPAT_STAMP)

$(COMPAT_STAMP): pyproject.toml constraints-main.txt $(LLAMAFACTORY_MAIN) $(COMPAT_REBUILD) | $(STAMP)
	rm -rf $(COMPAT_VENV)
	$(VENV)/bin/python -m venv --without-pip $(COMPAT_VENV)
	$(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
		> "$$($(COMPAT_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_aimkp_base_venv.pth"
	$(COMPAT_VENV)/bin/python -m pip install --quiet --no-deps --ignore-installed --no-build-isolation \
		-c constraints-main.txt $$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' constraints-main.txt | grep -vx llamafactory) \
		$(LLAMAFACTORY_MAIN)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --no-deps --ignore-installed -e .
	printf '#!%s\nimport sys\nfrom torch.distributed.run import main\nif __name__ == "__main__":\n    sys.exit(main())\n' \
		$(COMPAT_VENV)/bin/python > $(COMPAT_VENV)/bin/torchrun && chmod +x $(COMPAT_VENV)/bin/torchrun
	$(COMPAT_VENV)/bin/python -m pip check
	echo "$(CURDIR)" > $@

FORCE:

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

# The compat subset (tests marked compat) against LLaMA-Factory main in build/venv-main, whose bin comes first on
# PATH; the browser test needs /usr/bin/chromium (`make browser`) and is left out without it.
test-compat: setup-compat
	@test -x /usr/bin/chromium || echo "test-compat: /usr/bin/chromium is missing, the browser test is left out (make browser)"
	PATH="$(COMPAT_VENV)/bin:$$PATH" python -m pytest -m compat \
		$(if $(wildcard /usr/bin/chromium),,--deselect tests/test_webui.py::test_browser_preview_shows_the_section_values)

lint: setup
	ruff check . && ruff format --check .

clean:
	rm -rf $(BUILD) data/demo
