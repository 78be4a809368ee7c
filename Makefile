# Two commands do all set-up on a fresh machine:  make run   |   make test
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= all
CONFIG ?= config/config.yaml
ARGS ?=
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install run report test test-fast bench dry-run lint mlflow-ui clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: install  ## the whole workflow on the default config; prints the workflow's own time
	@start=$$(date +%s.%N); \
	snakemake --cores $(CORES) --resources gpu=1 --configfile $(CONFIG) $(ARGS); status=$$?; \
	echo "workflow time (without installation): $$(python3 -c "print(f'{$$(date +%s.%N) - $$start:.1f}')") s"; \
	exit $$status

# after `make run` (same CONFIG): one self-contained HTML with the reports and plots of every experiment by phase
report: install
	snakemake --report report.html --configfile $(CONFIG) $(ARGS)

# two workers, a test file each: the end-to-end files wait on Snakemake's serial steps much of the time
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20 $(ARGS)

# the inner loop: everything but the end-to-end tests (those marked e2e run Snakemake workflows)
test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not e2e" $(ARGS)

bench: install
	$(PY) bench/run.py $(ARGS)

dry-run: install
	snakemake -n --configfile $(CONFIG)

lint: install
	snakemake --lint

mlflow-ui: install
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1

clean:
	# reports/templates/ is source: only the generated per-experiment folders go
	find reports -mindepth 1 -maxdepth 1 -type d ! -name templates -exec rm -rf {} +
	rm -rf results reports/index.md mlflow.db mlflow.db.lock mlruns .snakemake report.html report.zip
