# Two commands set everything up on a fresh machine:
#   make demo   # create .venv, install, run stmorph on built-in synthetic tissue, write demo_out/report.html
#   make test   # create .venv, install, run the test suite
#   make docs   # build the documentation site into docs/_build/html
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stmorph-installed

.PHONY: setup demo test docs bench clean

setup: $(STAMP)

# torch first, the CPU build, so nothing below pulls a multi-GB CUDA build: PyTorch's CPU index where it can be
# reached (pip's own index and find-links stay as well), else whatever pip's configuration offers.
# TORCH_INDEX= (empty) skips the CPU index, e.g. to get a CUDA build from the public index.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install -q torch==2.13.0 --extra-index-url $(TORCH_INDEX) --timeout 15 --retries 1 || )$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all,test]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/stmorph demo --out demo_out --force

test: setup
	$(PY) -m pytest -q

# the documentation site, offline, warnings as errors
docs: setup
	$(PY) -m sphinx -W -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

clean:
	rm -rf $(VENV) demo_out docs/_build
