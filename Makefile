# The two set-up commands of the README. Each creates .venv on first use (pinned versions).
#   make run    the main job on the embedded dataset
#   make test   format and lint checks, then the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test format

$(VENV)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

run: $(VENV)/.runtime
	$(BIN)/python -m pgpc_jax.main --config configs/synthetic.py --workdir runs/synthetic

# Two pytest workers (one per core; a file's tests stay together so its module fixtures run
# once), then the tests marked `serial`, alone: they start processes of their own.
test: $(VENV)/.test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not serial" --durations=10
	$(BIN)/python -m pytest -q -m serial --durations=5

format: $(VENV)/.test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
