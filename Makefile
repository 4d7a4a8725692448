# One command to set up and run the main job, one to run the tests (see README).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY      = $(VENV)/bin/python
WORKDIR ?= runs/dates

.PHONY: demo test test-all test-fast venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

# Train the default task (dates -> ISO) and translate a few examples.
demo: venv
	$(PY) -m s2s_jax train --config experiments/configs/dates.py --workdir $(WORKDIR)
	printf '%s\n' "3rd of March 2021" "Mar 3, 21" "2021/3/3" "Tuesday, July 4th 1989" "31.12.1999" \
	  | $(PY) -m s2s_jax translate --workdir $(WORKDIR) --attention-plot $(WORKDIR)/attention.png

# The whole suite CI runs (everything but GPU-only tests).
test: venv
	$(PY) -m pytest -q -m "not gpu and not extended"

# Everything but GPU tests: also the full reference matrices (marked extended).
test-all: venv
	$(PY) -m pytest -q -m "not gpu"

# Quick loop while developing: skips tests marked slow.
test-fast: venv
	$(PY) -m pytest -q -m "not gpu and not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
