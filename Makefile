# Set-up is part of every target: a fresh clone needs only `make test` (or `make serve`).
# -P (Python 3.11+) keeps the working directory off sys.path: the folder `operator/` must never
# shadow the standard library module of that name, in pip, venv or pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
SERVE_STAMP := $(VENV)/.installed-serve
# torch 2.13.0 (CPU build) lies on the CI machines' disk; the project's own torch requirement
# is a range that it satisfies, so nothing heavier is fetched.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# `make serve PORT=9000 SERVE_ARGS="--api-key secret"`
PORT ?= 8000
SERVE_ARGS ?=

.PHONY: test lint serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -P -m venv $(VENV)
	$(PY) -P -m pip install -q --upgrade pip
	$(PY) -P -m pip install -q "$(TORCH_SPEC)"
	$(PY) -P -m pip install -q -e '.[test]'
	touch $@

# The server needs only the project itself (no test extras).
$(SERVE_STAMP): pyproject.toml
	$(PYTHON) -P -m venv $(VENV)
	$(PY) -P -m pip install -q --upgrade pip
	$(PY) -P -m pip install -q "$(TORCH_SPEC)"
	$(PY) -P -m pip install -q -e .
	touch $@

# The OpenAI-compatible server on the embedded demo model, on the GPU if there is one, else CPU.
serve: $(SERVE_STAMP)
	$(VENV)/bin/metroline serve demo --port $(PORT) $(SERVE_ARGS)

lint: $(STAMP)
	$(PY) -P -m ruff check .

# -P keeps the working directory off sys.path, so the folder `operator/` never shadows the
# standard library's `operator` module; the package is imported as metroline.operator.
test: $(STAMP) lint
	$(PY) -P -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
