# nestprune — targets a newcomer can guess.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
# the project's shared folder (prebuilt wheels, corpus): beside the checkout, or $(SHARED)
SHARED  ?= $(firstword $(wildcard ../shared $(CURDIR)/../shared /work/shared))
LLAMA_WHEEL := $(firstword $(wildcard $(SHARED)/wheels/llama_cpp_python-*.whl))

.PHONY: install test lint demo bench bench-quality bench-task bench-materialize bench-registry bench-build schemas clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# llama.cpp for the GGUF tests: a prebuilt wheel from the shared folder where there is one (else they skip)
	if [ -n "$(LLAMA_WHEEL)" ]; then $(BIN)/python -m pip install -q $(LLAMA_WHEEL); fi
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install nestprune with its test tools (CPU torch)

test: $(STAMP)  ## the CPU test suite (what CI runs)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check nestprune cli schemas tests bench

schemas: $(STAMP)  ## regenerate the committed JSON Schema files
	$(BIN)/python -m nestprune.schemas.export

demo: $(STAMP)  ## build -> inspect -> materialize two sizes -> generate, on the bundled sample (CPU, a few minutes)
	$(BIN)/python -m nestprune.demo --workdir runs/demo

bench: bench-materialize bench-registry  ## the speed/bytes benchmarks (CPU); bench-quality and bench-task train proxies

bench-materialize: $(STAMP)
	$(BIN)/python bench/materialize_speed.py

bench-quality: $(STAMP)
	$(BIN)/python bench/quality.py

bench-registry: $(STAMP)
	$(BIN)/python bench/registry_bytes.py

bench-task: $(STAMP)
	$(BIN)/python bench/task_aligned.py

bench-build: $(STAMP)  ## build speed and memory: compaction, lean accumulation, streamed calibration (CPU; ARGS="--scale gpu" on a GPU)
	$(BIN)/python bench/build_speed.py --corpus $(SHARED)/corpus $(ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
