# The two commands a new user runs: `make train` and `make test`.
# Both create .venv with Python >= 3.12 when it is missing and install jaxbig into it.
PYTHON ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: train test bench bench-perf bench-check setup clean-venv

train: $(STAMP)
	$(PY) scripts/train.py --mesh 4x2

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench.py

# Training speed per config and mesh, start-up, and the peers; writes docs/benchmarks.md (about 15 min).
bench-perf: $(STAMP)
	$(PY) scripts/bench.py --perf

# Fails when tokens/s falls more than 15% below the baseline recorded in docs/benchmarks.md.
bench-check: $(STAMP)
	$(PY) scripts/bench.py --perf --check

setup: $(STAMP)

$(PY):
	@py=""; \
	for c in $(PYTHON) python3.12 $$(ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null) python3.13 python3; do \
	  if command -v $$c >/dev/null 2>&1 && $$c -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))' >/dev/null 2>&1; then py=$$c; break; fi; \
	done; \
	if [ -z "$$py" ]; then echo "jaxbig needs Python >= 3.12 and found none; run 'make PYTHON=/path/to/python3.12 ...'"; exit 1; fi; \
	echo "creating $(VENV) with $$py ($$($$py --version))"; \
	$$py -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,export,serve]'
	@# tensorflow-serving-api requires the full `tensorflow` wheel, which would overwrite tensorflow-cpu;
	@# its protos (PredictionLog for warmup records, PredictionService) need only what is installed already.
	$(PY) -m pip install --quiet --no-deps 'tensorflow-serving-api==2.21.*'
	@touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
