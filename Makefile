# bnlab: two commands do all set-up on a fresh machine.
#   make demo   — create/reuse .venv, install, run the main job
#   make test   — create/reuse .venv, install, run the fast test suite
# torch is pinned and installed *first*: a bare "torch" requirement pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# timm imports torchvision; the one built for this torch (a bare "torchvision" would pull a newer torch)
TORCHVISION ?= torchvision==0.28.0
STAMP  := $(VENV)/.bnlab-installed
export OPENBLAS_NUM_THREADS ?= 1
export MPLBACKEND ?= Agg

.PHONY: install demo test test-all bench paper docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(TORCHVISION)"
	$(PY) -m pip install -q -e ".[dev,ray,integrations,interop,docs]"
	$(VENV)/bin/bnlab kernels --build
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bnlab reproduce --profile quick --out runs/quick

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/bnlab bench batchnorm --threads 1,2

paper: $(STAMP)
	$(VENV)/bin/bnlab reproduce --profile paper --out runs/paper

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build site src/*.egg-info
