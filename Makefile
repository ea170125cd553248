# Set-up and the two entry points of the README: `make demo` and `make test`.
# Both create .venv and install the project with its test extras when needed.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# clean-fid needs torchvision; on this project's CPU machines this is the pair that imports together.
# Elsewhere, install torch for your platform first, or override: make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# That pair is a CUDA build: about 6.2 GB in .venv. Without that much free disk here, stop before pip starts.
MIN_FREE_GB ?= 7

.PHONY: install demo test test-fast lint format bench bench-quick bench-toy2d clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || { free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  if [ -n "$$free" ] && [ "$$free" -lt "$(MIN_FREE_GB)" ]; then echo "error: $$free GB free on this disk; installing torch needs about $(MIN_FREE_GB) GB. Free some space (old clones, runs/), or run with MIN_FREE_GB=0 to try anyway" >&2; exit 1; fi; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "installing torch (the largest download; pip shows its progress) ..."
	$(BIN)/python -m pip install --progress-bar on $(TORCH_SPEC)
	@echo "installing apex and its dependencies ..."
	$(BIN)/python -m pip install --progress-bar on -e '.[test]'
	touch $(STAMP)

# The demo distils the shipped shapes teacher with the shapes-apex-cpu recipe, on a shorter budget than the
# recipe's own (DEMO_STEPS), and prints the report table; runs/demo/samples.png is the sample grid.
DEMO_STEPS ?= 400

demo: $(STAMP)
	$(BIN)/apex distill --recipe shapes-apex-cpu --set train.steps=$(DEMO_STEPS) --set output.dir=runs/demo --overwrite

test: $(STAMP) lint
	$(BIN)/python -m pytest

test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# docs/benchmarks.md, from scratch: APEX against consistency distillation, TwinFlow and DMD2 on the shipped shapes
# teacher. Quality is planned to 78 minutes in all, which leaves 12 of the 90 for speed and memory on 2 CPU cores.
# bench-quick: the same, shorter (quality in 10 minutes). bench-toy2d: the 2-D proof (docs/toy2d.md).
bench: $(STAMP)
	$(BIN)/python bench/quality.py --from-scratch
	$(BIN)/python bench/speed.py

bench-quick: $(STAMP)
	$(BIN)/python bench/quality.py --quick --from-scratch
	$(BIN)/python bench/speed.py --quick

bench-toy2d: $(STAMP)
	$(BIN)/python bench/step_cost.py
	$(BIN)/python bench/toy2d_ablation.py

clean:
	rm -rf $(VENV) runs bench/runs .pytest_cache .ruff_cache *.egg-info
