# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
PIP_CONSTRAINT_FLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
# pytest-xdist workers; the suite is sized for 2 CPU cores.
TEST_WORKERS ?= 2

.PHONY: install demo test interop peers-vllm clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_CONSTRAINT_FLAG) -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The main job: pre-train the tiny preset on the standard library's sources (~5 min on 2 cores).
demo: install
	$(VENV)/bin/dsv3 train

# `interop` tests need other engines (vLLM, llama.cpp) and minutes each: `make interop` runs them.
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not interop" tests

# Our checkpoints in unmodified peers: vLLM (own venv, .venv-vllm) and llama.cpp (llama-cpp-python
# from the [peers] extra, built from source), token for token against dsv3 on the demo model
# (runs/tiny/final, trained first if missing or of an unservable shape) and on random ones.
VENV_VLLM ?= .venv-vllm
INTEROP_RUN ?= runs/tiny

$(VENV)/.installed-peers: $(VENV)/.installed
	$(PY) -m pip install --quiet $(PIP_CONSTRAINT_FLAG) -e '.[test,peers]' && touch $@ || \
	  echo "make interop: the [peers] extra did not install (llama-cpp-python compiles llama.cpp: needs cmake and a C++ compiler); its tests will skip" >&2

peers-vllm:
	VENV_VLLM=$(VENV_VLLM) bash benchmarks/peers/install_vllm.sh

interop: install $(VENV)/.installed-peers
	test -f $(VENV_VLLM)/.installed || VENV_VLLM=$(VENV_VLLM) bash benchmarks/peers/install_vllm.sh || \
	  echo "make interop: vLLM did not install; its tests will skip" >&2
	model=$$($(PY) benchmarks/peers/interop_model.py $(INTEROP_RUN)) && \
	  DSV3_INTEROP_MODEL=$$model DSV3_VLLM_PYTHON=$(abspath $(VENV_VLLM))/bin/python \
	  $(PY) -m pytest -m interop -rs tests/interop

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
