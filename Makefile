# Everything runs inside .venv; `make run` and `make test` install it first when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the release this project is tested with; override for another build,
# e.g. `make install TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PROMPT ?= a red circle on a blue background
PYTEST_ARGS ?=

.PHONY: install run test bench lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: install
	$(VENV)/bin/ldm generate "$(PROMPT)" --seed 1 --out outputs

# pytest exits 5 when it collects no test; that is a failure here too.
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

bench: install
	$(PY) -m ldm_cli.bench $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check ldm_cli tests examples
	$(VENV)/bin/ruff format --check ldm_cli tests examples
	$(VENV)/bin/lint-imports  # the layers of docs/architecture.md (contracts in pyproject.toml)

format: install
	$(VENV)/bin/ruff format ldm_cli tests examples
	$(VENV)/bin/ruff check --fix ldm_cli tests examples

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
