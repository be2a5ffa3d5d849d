# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs vlrl, runs the tiny end-to-end recipe
#   make test   creates .venv, installs vlrl with dev extras (and Debian chromium for
#               the inspector's browser test), runs the fast test suite
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.vlrl-installed
# torch first: a CUDA build that also runs on CPU, and the one Qwen-VL processors'
# torchvision loads beside (torch 2.13.0+cpu cannot load torchvision).
TORCH   ?= torch==2.14.1 torchvision==0.29.1

CHROMIUM ?= /usr/bin/chromium

.PHONY: install browser demo test test-slow bench clean-runs

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The web inspector's tests drive Debian's Chromium with Playwright (no browser download).
browser:
	@test -x $(CHROMIUM) || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

demo: $(STAMP)
	$(VENV)/bin/vlrl run recipes/tiny.yaml

test: $(STAMP) browser
	$(PY) -m pytest -q

test-slow: $(STAMP) browser
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) bench/bench_pretrain.py
	$(PY) bench/bench_rewards.py

clean-runs:
	rm -rf runs/
