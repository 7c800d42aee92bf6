# Entry points. A fresh machine needs only: `make run` (main job) or `make test` (test suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DAYS   ?= 3

.PHONY: setup system-packages run test test-fast ui soak bench-serving clean

# The venv is rebuilt whenever the lock or the project metadata changes.
$(BIN)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e ".[test]"
	touch $@

system-packages:  ## Debian packages (PostgreSQL); installs only what is missing
	bash scripts/install_system_packages.sh

setup: system-packages $(BIN)/.installed

# The demo workspace (.sum/workspace, marked `demo`): a second `make run` stops its stack and recreates it;
# `--fresh` refuses any other workspace that holds promotions or runs a stack (see README, Commands).
run: setup  ## N simulated days through the real daily DAG (DAYS=3)
	$(BIN)/sumctl run --days $(DAYS) --fresh --demo

# --durations: every log (CI's included) ends with the slowest tests, and tests/conftest.py adds each module's total.
test: setup  ## the whole suite, services included (what CI runs)
	$(BIN)/pytest --durations=30

test-fast: setup  ## unit, data and model tests only
	$(BIN)/pytest -m "not slow" --durations=10

soak: setup  ## 30 simulated days with shifted candidates and corrupted partitions, scored (own workspace)
	$(BIN)/sumctl soak --days 30 --fresh --report reports/soak.json

bench-serving: setup  ## SOAP latency (no-op vs async vs realtime, 1x/10x/100x towers), store reads, write-backs
	$(BIN)/python -m benchmarks.serving_bench --json reports/serving_bench.json

ui: setup  ## Airflow UI on http://127.0.0.1:8080 for the workspace's runs
	$(BIN)/sumctl ui

clean:  ## delete .sum (every workspace and local remote under it) and reports; the stack is stopped first
	if [ -x $(BIN)/sumctl ]; then $(BIN)/sumctl down; fi
	rm -rf .sum reports

.PHONY: bench bench-consumers
bench: setup  ## training/inference benchmark of the model presets: ex/s, FLOP/s, matmul peak, MFU, batched vs unbatched
	$(BIN)/python -m benchmarks.train_bench --presets compact,large --json reports/train_bench.json

bench-consumers: setup  ## the consumer check's cost: its share of a default day through the DAG, its split, vs its floor
	$(BIN)/python -m benchmarks.consumer_check_bench --json reports/consumer_check_bench.json
