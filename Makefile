# The README's two commands: `make demo` (the main job on a built-in default) and `make test`.
# Both create .venv and install fm into it; torch is pinned (a CPU build on CPU-only machines,
# the CUDA build of the same version on a GPU machine).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
OUT ?= runs/demo

.PHONY: demo test install lint clean

$(BIN)/.fm-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q "$(TORCH_PIN)" -e ".[dev]"
	touch $@

install: $(BIN)/.fm-installed

demo: install
	$(BIN)/fm demo --out $(OUT)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
