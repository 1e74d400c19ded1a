# Two commands set everything up on a fresh machine:
#   make demo   # create .venv, install, run stmorph on built-in synthetic tissue
#   make test   # create .venv, install, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stmorph-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first: the CPU wheel, so nothing below pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all,test]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/stmorph demo --out demo_out --force

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo_out
