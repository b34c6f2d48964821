# One entry point per job; `make test` and `make demo` set up first, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup browser demo test test-fast bench lint clean

setup: $(STAMP)

# Torch first, the CPU build that lies on disk: anything else would pull a multi-GB CUDA build.
# open-clip-torch only for its CLIP BPE file, without deps (its torchvision replaces torch).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

# The web page's test drives Debian's chromium and its driver (as root, or through sudo).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  sudo=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$sudo apt-get update -q && $$sudo apt-get install -y -q chromium chromium-driver; }

demo: setup
	bash scripts/demo.sh

test: setup browser
	$(BIN)/python -m pytest -q --durations=15 tests

# No tritonserver, Milvus or S3 server and no test marked slow: under two minutes on 2 cores.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not triton and not milvus and not s3 and not browser and not slow" tests

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/pip install -q --no-deps clip-interrogator==0.6.0  # its phrase lists only (the cache workload)
	bash scripts/bench.sh

lint: setup
	$(BIN)/ruff check voltacache tests scripts
	$(BIN)/ruff format --check voltacache tests scripts

clean:
	rm -rf build engines/* triton_models/generated
