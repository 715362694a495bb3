# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# CPU installs pin PyTorch's CPU build through constraints-cpu.txt; on a GPU machine run with CONSTRAINTS= .
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints-cpu.txt
PIP_CONSTRAINT_ARG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: install browser demo test bench gpu-check lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_CONSTRAINT_ARG) -e ".[dev]"
	touch $@

# Debian's Chromium for the chat page's browser test (tests/test_serve_browser.py). Installed when this runs as
# root with apt-get; elsewhere the test is skipped with a note (under CI=true it fails instead).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; \
	  else echo "note: no chromium and no root apt-get; the browser test will be skipped (apt install chromium)"; fi; }

demo: install
	$(VENV)/bin/fermion demo

# Two workers (both cores), each test file kept in one worker so its module fixtures are made once.
test: install browser
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/decode.py

# The one-shot GPU check (at most 8 minutes; appends its table to bench/RESULTS-gpu.md). On a GPU machine install
# first with `make install CONSTRAINTS=` so pip picks PyTorch's CUDA build.
gpu-check: install
	$(PY) bench/gpu_check.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
