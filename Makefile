# make demo   set up (once) and run the whole pipeline on CPU: tiny target -> train -> eval -> export
# make test   set up (once) and run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The CPU build of torch; an unpinned torch in a fresh venv pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEMO   ?= runs/demo

.PHONY: venv test test-fast demo demo-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

artifacts/tiny-target/config.json: $(STAMP)
	$(PY) scripts/make_tiny_target.py --out artifacts/tiny-target

# Self-distillation on CPU: the tiny target's own greedy answers to 400 ShareGPT prompts, a head
# trained on them by two CPU processes under DeepSpeed ZeRO-2 (gloo, the same entry point as on
# GPUs), evaluated on held-out prompts, exported, and the export evaluated again.
# It starts over: a run dir belongs to one run, so the previous demo's dir is removed first.
demo: artifacts/tiny-target/config.json
	rm -rf $(DEMO)
	$(PY) scripts/regenerate_data.py --target artifacts/tiny-target --data sharegpt-package --limit 400 \
		--max-new-tokens 48 --max-turns 1 --max-len 256 --thinking off --batch-size 64 --device cpu \
		--out $(DEMO)/regen.jsonl --report $(DEMO)/regen_report.json
	$(PY) -m accelerate.commands.launch --config_file configs/accelerate/cpu_zero2.yaml \
		train/train_mtp.py --config configs/demo.yaml train.output_dir=$(DEMO) data.train=$(DEMO)/regen.jsonl \
		train.resume=none
	$(PY) scripts/export_mtp.py --check $(DEMO)/export --target artifacts/tiny-target
	$(PY) scripts/eval_acceptance.py --target artifacts/tiny-target --mtp $(DEMO)/export \
		--prompts $(DEMO)/eval_prompts.jsonl --steps 2 --max-new-tokens 32 --batch-size 8 \
		--device cpu --report $(DEMO)/eval_export.json
	# the export must reproduce the acceptance length its training checkpoint got
	$(PY) scripts/compare_reports.py $(DEMO)/eval.json $(DEMO)/eval_export.json --key acceptance_length
	# the head learned: held-out acceptance >= 1.15 and the training log's simulated value within 10%
	$(PY) scripts/check_demo.py $(DEMO) --min-acceptance 1.15 --max-gap 0.10

clean:
	rm -rf runs/demo artifacts/tiny-target
