# Every target bootstraps .venv itself, so a fresh clone needs nothing else.
#   make demo   the end-to-end rebuild on the digits preset: the pipeline trains its own teacher on real
#               handwritten digits and draws them in one step (CPU, no cloud, minutes); `--preset tiny` is the
#               fast plumbing check the tests use
#   make test   the test suite (starts its own SeaweedFS S3 server and Prefect API)
#   make stack-up / stack-down / stack-status   the local stack (S3 + Prefect UI + MLflow UI)
# GPU machines: `make TORCH_CONSTRAINT=constraints/lock.txt demo` keeps the tested pins but lets pip pick your
# CUDA torch instead of the CPU build.

PYTHON ?= python3
VENV ?= .venv
TORCH_CONSTRAINT ?= constraints/cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_C := $(if $(TORCH_CONSTRAINT),-c $(TORCH_CONSTRAINT),)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-fast lint bench stack-up stack-down stack-status clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(TORCH_CONSTRAINT) constraints/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install $(PIP_C) -e ".[dev]"
	$(BIN)/pip check
	touch $@

demo: $(STAMP)
	$(BIN)/instaflow rebuild --preset digits

# two pytest-xdist workers: most of the suite waits on subprocesses and services, not on the CPU; tests that
# share one Ray instance or the local stack's ports run in one worker each (xdist_group, --dist loadgroup)
test: $(STAMP)
	$(BIN)/pytest -q -ra --timeout=900 -n 2 --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow" --timeout=600 -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/method_gmm.py

stack-up: $(STAMP)
	$(BIN)/instaflow stack up

stack-down: $(STAMP)
	$(BIN)/instaflow stack down

stack-status: $(STAMP)
	$(BIN)/instaflow stack status

clean:
	rm -rf .instaflow .pytest_cache test-output
