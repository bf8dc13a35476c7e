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
	$(BIN)/arrag stages
	$(BIN)/snakemake --cores $(CORES) --configfile config/demo.yaml
	@echo
	@echo "Shapes world, benchmarks, models and metrics: results/demo/   logs: logs/demo/"
	@test -f results/demo/tables/README.md && echo "Tables and figures: results/demo/tables/" \
		|| echo "Tables: not produced yet (see the stages listed above as not implemented yet)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check arrag evaluators tests benchmarks
	$(BIN)/snakemake --lint --configfile config/demo.yaml

# The suite at 1, 2 and 4 threads, natively and on an emulated AVX2-only CPU, in a fresh clone of HEAD (about an
# hour on 2 cores); run it before submitting a change that touches numerics or tests.
portability:
	$(PYTHON) benchmarks/portability.py

dry-run: $(STAMP)
	for c in demo ci config; do $(BIN)/snakemake everything -n -q --configfile config/$$c.yaml || exit 1; done

clean-demo:
	rm -rf results/demo logs/demo
