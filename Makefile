# `make demo` and `make test` each set everything up on a fresh machine (virtualenv, pinned dependencies),
# then run. Models are fetched from the package registry into ~/.cache/dynq on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP := $(PY) -m pip --disable-pip-version-check

# llama-cpp-python is built from source. Its native build uses AMX where the CPU advertises it, and some virtual
# machines advertise AMX but fault on its instructions (SIGILL on the first matrix multiply), so on x86-64 the
# wheel is built with AMX off, once, into dynq's cache, and installed from there. The version is dynq's one pin
# (pyproject.toml and constraints.txt spell it too; tests/test_llamacpp_pin.py holds them to it).
LLAMA_VERSION := $(shell cat src/dynq/llamacpp/VERSION)
LLAMA_WHEELS := $(HOME)/.cache/dynq/wheels/llama-cpp-python-$(LLAMA_VERSION)-native-noamx
ifeq ($(shell uname -m),x86_64)
LLAMA_FLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif

.PHONY: setup check test test-long test-gpu lint demo fuzz clean

$(LLAMA_WHEELS)/.built:
	mkdir -p $(LLAMA_WHEELS)
	CMAKE_ARGS='-DGGML_NATIVE=ON -DCMAKE_C_FLAGS="$(LLAMA_FLAGS)" -DCMAKE_CXX_FLAGS="$(LLAMA_FLAGS)"' \
		$(PYTHON) -m pip wheel --quiet --no-deps --no-cache-dir -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_VERSION)
	touch $@

$(STAMP): pyproject.toml constraints.txt $(LLAMA_WHEELS)/.built
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(PIP) install --quiet -c constraints.txt --find-links $(LLAMA_WHEELS) -e '.[dev]'
	# llama.cpp's converter from the same source package, and its gguf-py as the one installed `gguf`
	$(PY) -c 'from dynq.llamacpp.converter import main; main()'
	touch $(STAMP)

setup: $(STAMP)

# The offline, model-free lane (tests marked unit: every test without model, cluster, slow or gpu): minutes.
check: setup
	$(PY) -m pytest -q -m unit --durations=15

# Every lane but the long one, with its slowest tests listed so that its cost stays in sight.
test: setup
	$(PY) -m pytest -q -m "not slow" --durations=30

# The long lane (tests marked slow: more models on the same paths, fault injection on a cluster) and the long fuzz.
test-long: setup
	$(PY) -m pytest -q -m slow --durations=30
	$(MAKE) fuzz

# The CUDA paths (tests marked gpu); on a machine without CUDA each says so and skips.
test-gpu: setup
	$(PY) -m pytest -q -m gpu -rs

# The long fuzz (tests/fuzzing.py): every kind of input dynq reads from strangers, mutated where its structure is.
fuzz: setup
	$(PY) tests/fuzzing.py --cases 100000 --kinds gguf,imatrix-gguf,imatrix-dat,recipe --seed 1
	$(PY) tests/fuzzing.py --cases 10000 --kinds checkpoint --seed 1
	$(PY) tests/fuzzing.py --cases 10000 --kinds shards --seed 1

lint: setup
	$(VENV)/bin/ruff check src tests scripts bench
	$(VENV)/bin/ruff format --check src tests scripts bench
	$(VENV)/bin/mypy

demo: setup
	$(VENV)/bin/dynq compare shapes:deepseek-r1 -r uniform-iq1_s -r dyn-iq1_s -r dyn-iq1_m -r dyn-iq2_xxs -r dyn-q2_k_xl
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
