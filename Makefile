# knorm-study: two commands on a fresh machine -- `make report` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNEL := knorm-study
PROFILE ?= full

.PHONY: setup data browser test report check-results lab bench compare clean-results

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

# Debian's Chromium for the real-browser test (Playwright drives it; no browser is downloaded).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "the browser test needs Debian's chromium: sudo apt-get install chromium"; exit 1; fi; }

test: data browser
	$(PY) -m pytest -q tests

# Any model, device and dtype: make report MODEL=<hub id, local path or gemma-3-270m> DEVICE=cuda DTYPE=bfloat16
# PROFILE=paper (results under the model's slug, its report in reports/<slug>/; YES=1 confirms a long CPU
# paper run; LEDGER=1 runs only what the claims ledger reads: 02, 04 and 07 with the variants its rows use;
# FORCE=1 reruns every notebook, unchanged or not). Without MODEL: the embedded SmolLM2, then each of the
# other embedded models in EMBEDDED (its results under its slug), each skipping what is unchanged;
# EMBEDDED= leaves them out.
EMBEDDED ?= gemma-3-270m
REPORT_FLAGS = --profile $(PROFILE) $(if $(DEVICE),--device $(DEVICE)) $(if $(DTYPE),--dtype $(DTYPE)) \
  $(if $(YES),--yes) $(if $(LEDGER),--ledger) $(if $(FORCE),--force)
report: data
	@rc=0; \
	$(PY) scripts/run_report.py $(REPORT_FLAGS) $(if $(MODEL),--model "$(MODEL)") || rc=1; \
	$(if $(MODEL),,for m in $(EMBEDDED); do $(PY) scripts/run_report.py $(REPORT_FLAGS) --model "$$m" || rc=1; done;) \
	exit $$rc

# Is every committed record still what today's code computes? (its behavioural identity; exit 1 naming
# each stale record and the probe that moved)
check-results: data
	$(PY) scripts/check_results.py

lab: data
	$(VENV)/bin/jupyter lab notebooks/

# Benchmarks record their JSON lines in the committed data/results/benchmarks/ (ad-hoc runs of a
# script write under build/results/ instead).
bench: data
	@for b in benchmarks/bench_*.py; do KNORM_RESULTS_DIR=data/results $(PY) $$b || exit 1; done

# Compare data/results with the committed (HEAD) results, field by field.
compare:
	$(PY) scripts/compare_results.py --profile $(PROFILE)

clean-results:
	rm -rf build/
