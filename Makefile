# Development entry points. Each target installs what it needs into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch for the optional interop tests (a plain `torch` may pull a CUDA build).
TORCH ?= torch==2.13.0

.PHONY: install test lint demo bench

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" || echo "PyTorch not installed: interop tests will skip"
	$(PY) -m pip install -q -e '.[test,demo,tensorboard]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q -n 2

# Train the demo model, export it to one file, and classify a few test digits with that file.
demo: install
	$(PY) train.py --config configs/tiny.py --workdir workdirs/tiny
	$(PY) -m aig_jax.export --workdir workdirs/tiny --out workdirs/tiny/model.aig \
		--samples_dir workdirs/tiny/samples
	$(PY) -m aig_jax.export.predict workdirs/tiny/model.aig workdirs/tiny/samples/*.png

bench: install
	$(PY) -m bench.speed --small
