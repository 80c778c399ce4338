# Two commands set a fresh machine up:  make train  (the main job)  and  make test  (the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.run-installed
DEV_STAMP := $(VENV)/.dev-installed
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: train test test-fast venv browser clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -e .
	touch $@

$(DEV_STAMP): $(RUN_STAMP) requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	# OpenAI's own CLIP tokenizer and BPE file, the tests' reference for the field's text pipeline;
	# without its dependencies (its torchvision would replace the CPU torch).
	$(PIP) --no-deps clip-anytorch==2.6.0
	touch $@

venv: $(DEV_STAMP)

train: $(RUN_STAMP)
	$(BIN)/python -m dgia_jax.main --config configs/default.py --workdir runs/default

# Every test (what CI runs): 395 tests in about 13-14 minutes on 2 cores from a fresh clone, caches empty.
test: $(DEV_STAMP) browser
	$(BIN)/python -m pytest -q -n 2 --durations=30 tests

# The quick tier (under 3 minutes on 2 cores): the in-process unit tests, every test not marked slow
# (slow: trains, serves, starts programs or compiles a whole tower or step; tests/conftest.py, pyproject.toml).
test-fast: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow" tests

# Debian's Chromium and ChromeDriver for the search page's browser test, installed when missing (as root);
# where they cannot be, that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	  >/dev/null 2>&1 || echo "chromium could not be installed: the browser test will be skipped"

clean-venv:
	rm -rf $(VENV)
