# The two commands the README promises: `make demo` and `make test`. Both build .venv first if needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP_CONSTRAINT := constraints.txt

.PHONY: setup demo test test-gpu lint clean

$(BIN)/sharp: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 is pinned in constraints.txt: it is the CPU wheel; unpinned, pip pulls a CUDA build.
	$(BIN)/pip install -q -c $(PIP_CONSTRAINT) -e ".[dev]"
	touch $(BIN)/sharp

setup: $(BIN)/sharp

# demo: 7 of 30 MLPs shared (15,17,...,27 reuse their predecessor; layers 28-29 are fragile, see RESEARCH.md),
# with the recipe docs/results/recovery_ablation_smollm2.md found best (a gate on the reference + rank-32 LoRA,
# closed-form init, SFT distilled from the original model), a small CPU budget (~15 min on 2 cores): train on the first 600 GPT4-Alpaca examples,
# score the last 40.
demo: setup
	$(BIN)/sharp assets fetch
	$(BIN)/sharp compress smollm2-135m --strategy next:14-27 --recovery lora+gate:32 \
		--data 'alpaca-demo[:600]' --eval-data 'alpaca-demo[-40:]' --eval-fraction 0 --max-len 256 \
		--slw-fraction 0.05 --slw-steps 50 --slw-workers 2 --sft-steps 12 --lr 1e-3 --batch-size 4 \
		--loss kd --eval-steps 0 --save-steps 6 --out runs/demo --overwrite

# -rs lists every skip with its reason; tests/skip_guard.py fails the run on any skip not declared optional.
test: setup
	$(BIN)/python -m pytest -x -q -rs -m "not gpu"

# The `gpu`-marked tests (CUDA against CPU numbers, bf16 compress with a KD teacher on the GPU). Needs a CUDA build
# of torch in .venv (setup installs the CPU wheel, so this target does not run setup) and refuses to run without a
# GPU instead of skipping every test.
test-gpu:
	$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: torch in $(VENV) sees no CUDA device; install a CUDA build of torch there first')"
	$(BIN)/python -m pytest -q -rs -m gpu

# ruff, and the import-linter contracts in pyproject.toml (data flows one way through sharp's layers, no circles)
lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) runs
