# Two commands for a fresh machine with Python 3.11:
#   make demo   virtual environment + install + the Shapes-world DAG end to end (2 CPU cores)
#   make test   virtual environment + install + the test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
# Commands the workflow's rules call (arrag, python -m evaluators) come from the virtual environment.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo test lint dry-run portability clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# pytorchfwd (FWD parity tests only) pins an old scipy: installed without its dependencies.
	$(BIN)/python -m pip install --quiet --no-deps pytorchfwd==1.0.1 ptwt==0.1.8
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile config/demo.yaml
	@echo
	@echo "Shapes world, benchmarks, models and metrics: results/demo/   logs: logs/demo/"
	@echo "Tables and figures: results/demo/tables/ (index: results/demo/tables/README.md)"

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check arrag evaluators tests benchmarks
	$(BIN)/snakefmt --check Snakefile workflow/rules
	for c in demo ci config; do $(BIN)/snakemake --lint --configfile config/$$c.yaml || exit 1; done

# The suite at 1, 2 and 4 threads, natively and on an emulated AVX2-only CPU, in a fresh clone of HEAD (about an
# hour on 2 cores); run it before submitting a change that touches numerics or tests.
portability:
	$(PYTHON) benchmarks/portability.py

dry-run: $(STAMP)
	for c in demo ci config; do $(BIN)/snakemake -n -q --configfile config/$$c.yaml || exit 1; done

clean-demo:
	rm -rf results/demo logs/demo
