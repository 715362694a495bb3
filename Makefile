# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# CPU installs pin PyTorch's CPU build through constraints-cpu.txt; on a GPU machine run with CONSTRAINTS= .
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints-cpu.txt
PIP_CONSTRAINT_ARG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: install demo test bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_CONSTRAINT_ARG) -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/fermion demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/decode.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
