# neopolyp: `make test` and `make demo` are the two commands a user needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA ?= demo_data

.PHONY: install test lint format demo clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q -n 2

demo: install
	test -d $(DEMO_DATA) || $(PY) -m data.synthetic --out $(DEMO_DATA) --n-train 60 --n-test 20 --seed 0 --size 256x320
	$(PY) pipeline.py --config configs/demo.yaml --data-dir $(DEMO_DATA)

clean:
	rm -rf outputs $(DEMO_DATA)
