# neopolyp: `make smoke` (two minutes), `make demo` (half an hour) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_SEED ?= 0
DEMO_DATA ?= demo_data_seed$(DEMO_SEED)
# The real test set's size: on 40 test images one small polyp of the wrong class moves the
# rows-Dice by 0.02, more than the gaps the test table is read for.
DEMO_N_TEST ?= 200
DEMO_OUT ?= outputs

.PHONY: install services test doctest lint format smoke demo mutation clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The SLURM test starts its own one-node cluster from Debian's packages (installed here
# when missing; root), the PostgreSQL test its own server.
services:
	bash scripts/test_services.sh

test: lint services
	$(PY) -m pytest -q -n 2

# Every fenced command of the README, run in order on tiny data (tests/test_readme_commands.py).
doctest: install
	$(PY) -m pytest -q -m readme_commands tests/test_readme_commands.py

# Every stage on tiny generated data in about two minutes on 2 cores (configs/smoke.yaml:
# a check of the machinery, not a model), then the exported package must reproduce the
# pipeline's submission.csv byte for byte. Outputs: outputs/smoke*; a rerun reuses them.
SMOKE_DATA ?= outputs/smoke_data
smoke: install
	test -d $(SMOKE_DATA) || $(PY) -m data.synthetic --out $(SMOKE_DATA) --n-train 16 --n-test 6 --seed 0 --size 96x128
	$(PY) pipeline.py --config configs/smoke.yaml --data-dir $(SMOKE_DATA) --parallel 2
	$(PY) export.py --config configs/smoke.yaml --data-dir $(SMOKE_DATA) --out outputs/smoke_package --force
	$(PY) infer.py --package outputs/smoke_package --images $(SMOKE_DATA)/test --out outputs/smoke_infer
	cmp outputs/smoke/submission.csv outputs/smoke_infer/submission.csv
	@echo "smoke: every stage ran; infer.py reproduced outputs/smoke/submission.csv (report: outputs/smoke/report.html)"

# Full-size frames (1280 x 959-1024) as in the real set; two fold processes use both cores.
demo: install
	test -d $(DEMO_DATA) || $(PY) -m data.synthetic --out $(DEMO_DATA) --n-train 120 --n-test $(DEMO_N_TEST) --seed $(DEMO_SEED)
	$(PY) pipeline.py --config configs/demo.yaml --data-dir $(DEMO_DATA) --out-dir $(DEMO_OUT) --parallel 2

# Mutation check of the modules that decide the submission ([tool.mutmut] in pyproject.toml,
# scores in docs/mutation.md). Not in `make test` or CI: it takes hours on 2 cores, so it
# runs at the lowest priority, one child, and one run per machine at a time.
# `$(VENV)/bin/mutmut results` then lists the survivors, `mutmut show NAME` shows one.
mutation: install
	nice -n 19 flock -n /tmp/neopolyp-mutmut.lock $(VENV)/bin/mutmut run --max-children 1

clean:
	rm -rf outputs demo_data_seed* mutants
