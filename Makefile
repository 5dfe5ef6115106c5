# One entry point. `make test` builds (or reuses) an isolated environment and runs the suite.
PYTHON ?= python3
# The environment is keyed by the dependency lists only, so it is reused across clones until they change.
ENV_KEY := $(shell $(PYTHON) tools/env_key.py)
VENV ?= $(or $(UNIFLOW_VENV),$(HOME)/.cache/uniflow-venv/$(ENV_KEY))
PY := $(VENV)/bin/python

.PHONY: env test test-fast lint bench checkpoints ablations demo example

$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

env: $(VENV)/.ready
	$(PY) -m pip install -q --no-deps -e .

# The whole suite, slow tests included (learning, resume after SIGKILL, two-process ZeRO-2/3): what CI runs.
test: env
	HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu $(PY) -m pytest -q tests

# Without the tests marked slow (each over ~10 s): for development.
test-fast: env
	HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu $(PY) -m pytest -q -m "not slow" tests

lint: env
	$(PY) -m ruff check .

bench: env
	$(PY) bench/tokenizer.py

BUNDLE ?= checkpoints/shapeworld

# Rebuild the shipped ShapeWorld checkpoints from nothing on a CPU (see docs/results.md for the time it takes):
# pretrain the tiny encoder (the teacher), adapt it into the tokenizer, write the fp16 bundle, measure it.
checkpoints: env
	$(PY) -m app.cli train encoder --config train/configs/encoder_tiny.yaml
	$(PY) -m app.cli train encoder --config train/configs/encoder_tiny.yaml export.dtype=float16 \
		export.dir=$(BUNDLE)/encoder --resume --export-only
	$(PY) -m app.cli train tokenizer --config train/configs/tokenizer_tiny.yaml export.dtype=float16 \
		export.dir=$(BUNDLE)/tokenizer
	$(PY) -m eval.shapeworld_tokenizer --bundle $(BUNDLE) --out $(BUNDLE)/eval.json

# The paper's two ablations at ShapeWorld scale, each at the budget of the bundled run (after `make checkpoints`,
# which leaves the baseline in runs/tokenizer_tiny): uniform instead of adaptive layer weights, and no global blocks.
TRAIN_TOKENIZER := $(PY) -m app.cli train tokenizer --config train/configs/tokenizer_tiny.yaml
EVAL_TOKENIZER := $(PY) -m eval.shapeworld_tokenizer --bundle $(BUNDLE)
ablations: env
	$(TRAIN_TOKENIZER) model.distill.weighting=uniform run_dir=runs/abl_uniform \
		export.dir=runs/abl_uniform/export export.dtype=float16
	$(EVAL_TOKENIZER) --tokenizer runs/abl_uniform/export --out runs/abl_uniform/eval.json
	$(TRAIN_TOKENIZER) model.decoder.global_depth=0 run_dir=runs/abl_gtb0 \
		export.dir=runs/abl_gtb0/export export.dtype=float16
	$(EVAL_TOKENIZER) --tokenizer runs/abl_gtb0/export --out runs/abl_gtb0/eval.json
	$(PY) -m eval.compare_runs baseline=runs/tokenizer_tiny uniform=runs/abl_uniform global_depth_0=runs/abl_gtb0

# Reconstruct held-out ShapeWorld images with the bundled tokenizer and print PSNR/SSIM per image.
example: env
	$(PY) -m app.cli data shapes --out outputs/example --num 8 --split heldout --no-progress --overwrite
	$(PY) -m app.cli reconstruct outputs/example/heldout/*/*.png --tokenizer $(BUNDLE)/tokenizer --out outputs/example/recon \
		--overwrite
