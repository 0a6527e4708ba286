# make demo: set up .venv and run the main job on the embedded CPU default.
# make test: set up .venv with the test extra, lint (make lint), then run the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo lint test test-all bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) install -e '.[test]'
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base  # the CPU: a venv with the test extra also holds libtpu, which would look for TPUs
	JAX_PLATFORMS=cpu $(PY) scripts/demo.py

lint: $(VENV)/.installed-test  # ruff is in the test extra; the check covers a venv made before it was
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PIP) install 'ruff>=0.6,<1'
	$(PY) -m ruff check lwm_jax tests scripts

test: $(VENV)/.installed-test lint  # two workers: one per core (compiling is mostly single-threaded)
	$(PY) -m pytest -q --durations=15 -m "not slow" -n 2 --dist loadfile

test-all: $(VENV)/.installed-test
	$(PY) -m pytest -q --durations=15 -n 2 --dist loadfile

bench: $(VENV)/.installed-test
	$(PIP) install --no-deps ringattention==0.1.2 einops==0.8.2  # the anchor, not a dependency
	$(PY) scripts/bench_attention.py
	$(PY) scripts/bench_data.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache

mini-extension: $(VENV)/.installed-base  # the default run of the miniature: about 21 minutes on 2 CPU cores
	$(PY) scripts/mini_extension.py
