# make demo: build the built-in tiny FLUX recipe and generate a PNG; make test: the CPU test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/dtc: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[cpu,dev]'
	touch $(BIN)/dtc

demo: $(BIN)/dtc
	$(BIN)/dtc build --recipe recipes/tiny-flux.yaml
	$(BIN)/dtc inspect engines/tiny-flux --verify
	$(BIN)/dtc run engines/tiny-flux --prompt "a red fox in the snow" --steps 4 --seed 0 --out engines/tiny-flux-demo.png

test: $(BIN)/dtc
	$(BIN)/python -m pytest -q

lint: $(BIN)/dtc
	$(BIN)/ruff check dtcompile tests
	$(BIN)/ruff format --check dtcompile tests
	$(BIN)/lint-imports

clean:
	rm -rf engines
