# fastsprkd: `make test` and `make demo` are the two commands a fresh clone needs.
SHELL := /bin/bash
export OMP_WAIT_POLICY ?= PASSIVE
export MPLBACKEND ?= Agg
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NB_WORKERS ?= 2

.PHONY: test demo bench sync-check docs-check docs-run docs-screenshots pytest nbtest export clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Fails when a notebook is not clean or a module does not match its notebook.
sync-check: $(STAMP)
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  before="$$( (git status --porcelain -- nbs fastsprkd; git diff -- nbs fastsprkd) | sha1sum)"; \
	  $(BIN)/nbdev-clean >/dev/null 2>&1 || { echo "nbdev-clean failed"; exit 1; }; \
	  $(BIN)/nbdev-export || { echo "nbdev-export failed"; exit 1; }; \
	  after="$$( (git status --porcelain -- nbs fastsprkd; git diff -- nbs fastsprkd) | sha1sum)"; \
	  if [ "$$before" != "$$after" ]; then \
	    echo "ERROR: nbdev-clean/nbdev-export changed tracked files: the notebooks in nbs/ and the modules in"; \
	    echo "fastsprkd/ are out of sync (or a notebook is not clean). The notebooks are the source: edit them,"; \
	    echo "run '$(BIN)/nbdev-clean && $(BIN)/nbdev-export', and commit nbs/ and fastsprkd/ together."; \
	    git status --short -- nbs fastsprkd | head -20; exit 1; \
	  fi; \
	  echo "nbs/ and fastsprkd/ are in sync"; \
	fi

pytest: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

nbtest: $(STAMP)
	$(BIN)/nbdev-test --n-workers $(NB_WORKERS)

# Fails when nbdev's docs processing (nbdev-proc-nbs, the step before Quarto) crashes, or when tools/nbcheck.py
# finds a cell mixing imports and code, a visible check cell, a plot without a stored image (run `make docs-run`),
# a reference to a file the reader does not have, or a link to a page/file that does not exist.
docs-check: $(STAMP)
	$(BIN)/python tools/nbcheck.py --check --proc --n-workers $(NB_WORKERS)

# Executes every notebook in nbs/ in place (slow cells included; progress bars off, fixed seeds, small outputs),
# then nbdev-clean (it keeps the outputs, drops execution counts and metadata).
docs-run: $(STAMP)
	$(BIN)/python tools/nbrun.py nbs --n-workers $(NB_WORKERS)
	$(BIN)/nbdev-clean

# Processed docs of the core, observer and tutorial pages -> HTML (pandoc) -> PNGs in docs/ (headless Chromium).
docs-screenshots: $(STAMP)
	$(BIN)/python tools/nbcheck.py --proc --skip no-plot-output,visible-test,mixed-imports,external-ref,dead-link,index-stale --n-workers $(NB_WORKERS)
	$(BIN)/python tools/screenshots.py

test: sync-check docs-check pytest nbtest

demo: $(STAMP)
	$(BIN)/fastsprkd demo

bench: $(STAMP)
	$(BIN)/python bench/run.py

export: $(STAMP)
	$(BIN)/nbdev-clean && $(BIN)/nbdev-export

clean:
	rm -rf $(VENV) build dist *.egg-info
