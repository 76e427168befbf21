# make test: create .venv if missing, install requirements, lint (ruff, zero findings), install Chromium for the
#   report's browser test when it is missing (Debian's package, as root), run the test suite.
# make lint: only the lint.
# make demo: the same set-up, then generate the synthetic data set and train on it (CPU here).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_FLAGS := --DATASETS.NAMES synthetic --DATASETS.ROOT_DIR data --OUTPUT_DIR output/demo \
	--MODEL.NAME resnet18 --MODEL.PRETRAINED false --INPUT.SIZE_TRAIN 128 64 --INPUT.SIZE_TEST 128 64 \
	--SOLVER.MAX_EPOCHS 6 --SOLVER.WARMUP_EPOCHS 2 --SOLVER.BASE_LR 1e-3 --DATALOADER.NUM_WORKERS 2

.PHONY: test lint chromium demo clean

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# test/test_report.py opens the HTML report in headless Chromium; without root or apt it skips and says why
chromium:
	@test -x /usr/bin/chromium || command -v chromium >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || \
		echo "note: chromium could not be installed: test/test_report.py's browser test will be skipped"

test: lint chromium
	$(PY) -m pytest -q test

data/synthetic: | $(STAMP)
	$(PY) data.py synthesize data/synthetic

demo: $(STAMP) data/synthetic
	$(PY) evaluate.py baseline data/synthetic
	rm -rf output/demo
	$(PY) train.py $(DEMO_FLAGS)

clean:
	rm -rf output test/output .pytest_cache
