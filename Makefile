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
	$(PY) -m pip install -q --no-deps $(shell $(PYTHON) tools/env_key.py --no-deps)
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
	$(PY) -m app.cli latent-stats --tokenizer $(BUNDLE)/tokenizer --data shapeworld --overwrite
	$(PY) -m eval.shapeworld_tokenizer --bundle $(BUNDLE) --out $(BUNDLE)/eval.json
	$(PY) -m app.cli train generator --config train/configs/generator_tiny.yaml model.tokenizer=$(BUNDLE)/tokenizer \
		export.dtype=float16 export.dir=$(BUNDLE)/generator
	$(PY) -m eval.shapeworld_generator --generator $(BUNDLE)/generator --teacher $(BUNDLE)/encoder \
		--grid docs/figures/generator.png --out $(BUNDLE)/generator_eval.json --overwrite
	$(PY) -m app.cli train mllm --config train/configs/mllm_tiny_stage1.yaml
	$(PY) -m app.cli train mllm --config train/configs/mllm_tiny_stage2.yaml export.dir=$(BUNDLE)/mllm
	$(PY) -m eval.shapeworld_vqa --mllm $(BUNDLE)/mllm --out $(BUNDLE)/mllm_eval.json
	$(PY) tools/bundle_manifest.py --bundle $(BUNDLE)

# The paper's two ablations at ShapeWorld scale, at the 400-step search budget (docs/results.md): the recipe of
# tokenizer_tiny.yaml as the baseline, uniform instead of adaptive layer weights, and no global blocks; plus the
# recipe without the procedural mix. Each arm one thread; run them side by side on a 2-core machine with `make -j2`.
# Needs the teacher of `make checkpoints` (runs/encoder_tiny/export).
TRAIN_TOKENIZER := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m app.cli train tokenizer \
	--config train/configs/tokenizer_tiny.yaml steps=400 log.eval_every=0 checkpoint.every=0 export.dtype=float16
EVAL_TOKENIZER := $(PY) -m eval.shapeworld_tokenizer --bundle $(BUNDLE) --teacher runs/encoder_tiny/export/encoder.safetensors
ARMS := p25 p25_uniform p25_gtb0 p0
ARM_p25 :=
ARM_p25_uniform := model.distill.weighting=uniform
ARM_p25_gtb0 := model.decoder.global_depth=0
ARM_p0 := data.procedural_share=0
ablations: $(addprefix runs/arm_,$(addsuffix /eval.json,$(ARMS)))
	$(PY) -m eval.compare_runs $(foreach a,$(ARMS),$(a)=runs/arm_$(a))
runs/arm_%/eval.json: | env
	$(TRAIN_TOKENIZER) run_dir=runs/arm_$* export.dir=runs/arm_$*/export $(ARM_$*)
	$(EVAL_TOKENIZER) --tokenizer runs/arm_$*/export --grid runs/arm_$*/grid.png --out $@

# The main job: the demo on the bundled ShapeWorld models (chat, generate, reconstruct) at http://127.0.0.1:7860.
demo: env
	HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu $(PY) -m app.cli demo $(DEMO_ARGS)

# Reconstruct held-out ShapeWorld images with the bundled tokenizer and print PSNR/SSIM per image.
example: env
	$(PY) -m app.cli data shapes --out outputs/example --num 8 --split heldout --no-progress --overwrite
	$(PY) -m app.cli reconstruct outputs/example/heldout/*/*.png --tokenizer $(BUNDLE)/tokenizer --out outputs/example/recon \
		--overwrite
