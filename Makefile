# The two commands a new user runs: `make train` and `make test`.
# Both create .venv with Python >= 3.12 when it is missing and install jaxbig into it.
PYTHON ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_OUT := runs/peers
# python3.11: a torch 2.13.0 CPU wheel exists for it.
PEERS_PYTHON ?= python3.11
PEERS_THREADS ?= 2
PEERS_STEPS ?= 30
# pytest-xdist workers for `make test`. The suite is mostly XLA compiles (one thread each) and subprocess start-ups,
# so two workers fill a 2-core machine; --dist loadfile keeps each test file (and its module fixtures) in one worker.
TEST_WORKERS ?= 2

.PHONY: train test bench bench-perf bench-check bench-peers setup prometheus clean-venv

train: $(STAMP)
	$(PY) scripts/train.py --mesh 4x2

test: $(STAMP) $(PEERS_VENV)/.installed prometheus
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(PY) scripts/bench.py

# Training speed per config and mesh, start-up, and the PyTorch peer; writes docs/benchmarks.md (about 20 min).
bench-perf: $(STAMP) $(PEERS_VENV)/.installed
	$(PY) scripts/bench.py --perf

# Fails when tokens/s falls more than 15% below the baseline recorded in docs/benchmarks.md.
bench-check: $(STAMP)
	$(PY) scripts/bench.py --perf --check

setup: $(STAMP)

# The real Prometheus and promtool (Debian's `prometheus` package): tests/test_monitoring.py checks and unit-tests the
# alert rules in configs/monitoring/ with promtool and fires them in a Prometheus of its own (own config, data
# directory and free port; the package's service is never used).
prometheus:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	    echo "the monitoring tests need prometheus and promtool: install Debian's 'prometheus' package (apt-get install prometheus) or put both binaries on PATH"; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# The reference venv: PyTorch eager trains the same Llama (benchmarks/peers/README.md), and transformers is the
# reference the Hugging Face import/export tests compare against (tests/hf_reference.py). `make test` builds it
# (about 1.5 min, 1.2 GB). torch is pinned: an unpinned `pip install torch` pulls the CUDA build (GBs).

$(PEERS_VENV)/.installed: benchmarks/peers/requirements.txt
	@command -v $(PEERS_PYTHON) >/dev/null 2>&1 || { echo "the reference venv needs $(PEERS_PYTHON) (torch's CPU wheel); run 'make PEERS_PYTHON=/path/to/python3.11 ...'"; exit 1; }
	test -x $(PEERS_PY) || $(PEERS_PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install --quiet -r benchmarks/peers/requirements.txt
	@touch $@

bench-peers: $(PEERS_VENV)/.installed
	$(PEERS_PY) benchmarks/peers/torch_llama.py --d-model 256 --layers 4 --heads 4 --kv-heads 4 --head-dim 64 --d-ff 768 \
	  --vocab 256 --seq-len 256 --batch 16 --lr 2e-3 --lr-warmup 30 --steps $(PEERS_STEPS) --warmup-steps 3 \
	  --threads $(PEERS_THREADS) --json $(PEERS_OUT)/torch_d256.json
	$(PEERS_PY) benchmarks/peers/torch_llama.py --d-model 512 --layers 4 --heads 8 --kv-heads 8 --head-dim 64 --d-ff 1536 \
	  --vocab 256 --seq-len 256 --batch 8 --steps $(PEERS_STEPS) --warmup-steps 3 \
	  --threads $(PEERS_THREADS) --json $(PEERS_OUT)/torch_d512.json

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
	$(PY) -m pip install --quiet -e '.[dev,export,serve,onnx,ps]'
	@# tensorflow-serving-api requires the full `tensorflow` wheel, which would overwrite tensorflow-cpu;
	@# its protos (PredictionLog for warmup records, PredictionService) need only what is installed already.
	$(PY) -m pip install --quiet --no-deps 'tensorflow-serving-api==2.21.*'
	@# jax2onnx pins orbax-checkpoint<0.11.37 while jaxbig needs >=0.12, and asks for equinox, dm-pix, netron and
	@# orbax-export for optional plugins; the `onnx` extra has what the converter needs (pyproject.toml).
	$(PY) -m pip install --quiet --no-deps 'jax2onnx==0.17.*'
	@touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
