# Two commands do everything: `make demo` and `make test` (each installs into .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py constraints.txt | cksum | cut -d' ' -f1)
# libtpu, for `python -m clipjax.plan` (compiles for TPU topologies on this host, no TPU needed):
# the version jax[tpu] pins for the jax in constraints.txt (0.0.42.1 for jax 0.10.2); change both
# together. Installed under $(VENV)/tpu, outside the import path, so CPU runs never load it.
LIBTPU_VERSION := 0.0.42.1
LIBTPU := $(VENV)/tpu/.installed-libtpu-$(LIBTPU_VERSION)
# CPU runs: XLA's large host buffers on transparent huge pages (see clipjax/hostmem.py); a
# hugetlb setting of the caller's own is kept.
ifeq ($(findstring glibc.malloc.hugetlb,$(GLIBC_TUNABLES)),)
export GLIBC_TUNABLES := $(if $(GLIBC_TUNABLES),$(GLIBC_TUNABLES):)glibc.malloc.hugetlb=1
endif

.PHONY: install demo lint browser test clean lock

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# Exactly the tested versions (constraints.txt); `make lock` refreshes them.
$(STAMP): $(PY) setup.py constraints.txt
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	# The reference tokenizer for parity tests: OpenAI's own code, without its torch dependency.
	$(PY) -m pip install -c constraints.txt --no-deps clip-anytorch==2.6.0
	rm -f $(VENV)/.installed-* && touch $@

$(LIBTPU): $(PY)
	rm -rf $(VENV)/tpu
	$(PY) -m pip install --no-deps --target $(VENV)/tpu libtpu==$(LIBTPU_VERSION)
	touch $@

install: $(STAMP) $(LIBTPU)

demo: install
	$(PY) -m clipjax.demo

# ruff's settings are in pyproject.toml.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The search page's browser test drives Debian's chromium through chromium-driver: installed with
# apt-get where this runs as root; elsewhere (or if apt fails) that test skips and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  { apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -qq install -y \
	    chromium chromium-driver >/dev/null; } \
	  || echo "browser: apt-get could not install chromium; the browser test will skip"; \
	else echo "browser: chromium not installed and not root with apt-get; the browser test will skip"; fi

# Two workers (pytest-xdist), a test file each at a time: module fixtures are built once, and the
# suite's subprocesses and compiles leave the second core idle much of the time otherwise.
test: lint browser
	$(PY) -m clipjax.doctor
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# Resolve setup.py's ranges afresh in a scratch environment and record the result.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q -e '.[test,bench]'
	.venv-lock/bin/pip install -q --no-deps clip-anytorch==2.6.0
	{ sed -n '1,2p' constraints.txt; .venv-lock/bin/pip list --format=freeze --exclude-editable \
	  | grep -viE '^(pip|setuptools|wheel)=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .pytest_cache
