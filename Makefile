# make test: create .venv if missing, install requirements, run the test suite.
# make demo: the same set-up, then generate the synthetic data set and train on it on the CPU.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo clean

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q test

demo: $(STAMP)
	test -d data/synthetic || $(PY) data.py synthesize data/synthetic
	$(PY) data.py check data/synthetic --dataset synthetic

clean:
	rm -rf output test/output .pytest_cache
