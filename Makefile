# perceive_ray: `make demo` (the main job on embedded defaults) and `make test`.
# Both bootstrap .venv on a fresh machine. torch/torchvision are pinned to the pair on local disk and installed
# first, so nothing downloads a multi-GB build; everything else comes from the exact lock file.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast test-benchmarks lint lock clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/lock-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PAIR)
	$(PY) -m pip install --quiet -r requirements/lock-cpu.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -c "import torch, torchvision, ray, transformers, open_clip, peft, mlflow, deepspeed; print('venv ok: torch', torch.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

# The paper's controlled study in miniature (experiments/sweeps/demo_study.yaml) on a local Ray: a synthetic world, a
# tiny CLIP pretrained on it, its frozen encoder read six ways (Ray Tune over Ray Train + DeepSpeed, Ray Data
# scoring), everything in runs/demo/mlflow.db; prints the What'sUp table, the verdicts and the commands.
demo: $(STAMP)
	RAY_DISABLE_USAGE_STATS=1 HF_HUB_OFFLINE=1 $(VENV)/bin/perceive-ray demo

test: $(STAMP)
	$(VENV)/bin/ruff check perceive_ray tests
	$(PY) -m pytest -q --durations=25 -m "not benchmark_script"

# The benchmarks/ scripts' own end-to-end checks (each starts its own Ray; ~2.5 min), kept out of `make test`.
test-benchmarks: $(STAMP)
	$(PY) -m pytest -q -m benchmark_script

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check perceive_ray tests

# Regenerate the exact lock from the current venv (after changing dependency ranges in pyproject.toml).
lock: $(STAMP)
	{ echo "# Exact CPU lock for development and CI (Python 3.11, x86_64). Regenerate with: make lock"; \
	  echo "# torch/torchvision are the pair that lies on this machine's local disk; install them first (see Makefile)."; \
	  $(PY) -m pip freeze | grep -v -E "^(-e |perceive[-_]ray)"; } > requirements/lock-cpu.txt

clean-venv:
	rm -rf $(VENV)
