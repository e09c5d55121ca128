# Two commands do everything: `make demo` and `make test` (each installs into .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
# CPU runs: XLA's large host buffers on transparent huge pages (see clipjax/hostmem.py); a
# hugetlb setting of the caller's own is kept.
ifeq ($(findstring glibc.malloc.hugetlb,$(GLIBC_TUNABLES)),)
export GLIBC_TUNABLES := $(if $(GLIBC_TUNABLES),$(GLIBC_TUNABLES):)glibc.malloc.hugetlb=1
endif

.PHONY: install demo lint test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): $(PY) setup.py
	$(PY) -m pip install -e '.[test]'
	# The reference tokenizer for parity tests: OpenAI's own code, without its torch dependency.
	$(PY) -m pip install --no-deps clip-anytorch==2.6.0
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: install
	$(PY) -m clipjax.demo

# ruff's settings are in pyproject.toml.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
