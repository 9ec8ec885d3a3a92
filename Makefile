# knorm-study: two commands on a fresh machine -- `make report` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNEL := knorm-study
PROFILE ?= full

.PHONY: setup data test report lab bench clean-results

setup: $(STAMP)

# One pin list (requirements.txt) for pip and conda; a Jupyter kernel for this venv so papermill
# runs the notebooks in the project's own environment.
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (knorm-study)" >/dev/null
	touch $@

data: setup
	$(PY) scripts/make_data.py

test: data
	$(PY) -m pytest -q tests

report: data
	$(PY) scripts/run_report.py --profile $(PROFILE)
	$(PY) scripts/render_report.py --profile $(PROFILE)

lab: data
	$(VENV)/bin/jupyter lab notebooks/

bench: data
	@for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean-results:
	rm -rf build/
