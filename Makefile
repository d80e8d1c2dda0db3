# make demo: build the built-in tiny FLUX recipe and generate a PNG; make demo-video: the tiny Wan2.2 (two
# experts) to an MP4; make test: the CPU test suite; make lint: ruff, the import contracts and mypy
# (docs/architecture.md, "Checks"); make gpu-check: the GPU acceptance check (docs/gpu-check.md, on a machine
# with an NVIDIA GPU; GPU_CHECK_ARGS=--quick skips the real-width bench).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-video test gpu-check lint clean

$(BIN)/dtc: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[cpu,dev]'
	touch $(BIN)/dtc

demo: $(BIN)/dtc
	$(BIN)/dtc build --recipe recipes/tiny-flux.yaml
	$(BIN)/dtc inspect engines/tiny-flux --verify
	$(BIN)/dtc run engines/tiny-flux --prompt "a red fox in the snow" --steps 4 --seed 0 --out engines/tiny-flux-demo.png

demo-video: $(BIN)/dtc
	$(BIN)/dtc build --recipe recipes/tiny-wan22.yaml
	$(BIN)/dtc run engines/tiny-wan22 --prompt "a cat playing piano" --negative-prompt blurry --frames 9 --steps 4 --seed 0 --fps 8 --out engines/tiny-wan22-demo.mp4

test: $(BIN)/dtc
	$(BIN)/python -m pytest -q

gpu-check: $(BIN)/dtc
	$(BIN)/python scripts/gpu_check.py $(GPU_CHECK_ARGS)

lint: $(BIN)/dtc
	$(BIN)/ruff check dtcompile tests
	$(BIN)/ruff format --check dtcompile tests
	$(BIN)/lint-imports
	$(BIN)/mypy dtcompile

clean:
	rm -rf engines
