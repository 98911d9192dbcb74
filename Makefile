# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
PIP_CONSTRAINT_FLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
# pytest-xdist workers; the suite is sized for 2 CPU cores.
TEST_WORKERS ?= 2

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_CONSTRAINT_FLAG) -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The main job: pre-train the tiny preset on the standard library's sources (~5 min on 2 cores).
demo: install
	$(VENV)/bin/dsv3 train

test: install
	$(PY) -m pytest -n $(TEST_WORKERS) tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
