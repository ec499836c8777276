# polargrid_local: `make demo` and `make test` are all a newcomer needs.
#
# The environment lives in .venv/. llama-cpp-python is built by
# scripts/build_llama_cpp.py with flags read from this CPU (its default native
# build can crash on VMs that advertise AMX); the wheel is cached under
# ~/.cache/polargrid-local/wheels and reused on later runs.
#   make install-cuda CUDA_ARCH=90   builds the CUDA backend instead (needs nvcc).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.polargrid-installed
CUDA_ARCH ?= native
PYTEST_ARGS ?=


WHEELHOUSE ?= $(HOME)/.cache/polargrid-local/wheelhouse

.PHONY: install install-cuda models wheelhouse browser demo test fuzz bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

$(STAMP): $(PY) pyproject.toml setup.py scripts/build_llama_cpp.py polargrid_local/host/build_llama.py
	$(PY) scripts/build_llama_cpp.py $(LLAMA_BUILD_ARGS)
	$(PY) -m pip install --quiet -e ".[test,lint]"
	touch $@

install: $(STAMP)

install-cuda: $(PY)
	$(PY) scripts/build_llama_cpp.py --cuda --cuda-arch $(CUDA_ARCH)
	$(PY) -m pip install --quiet -e ".[test,lint]"
	touch $(STAMP)

# Fetches the default model of each kind (with `wheelhouse`, the only steps that use the network).
models: install
	$(PY) -m polargrid_local pull
	$(PY) -m polargrid_local pull smollm2-135m-instruct smollm2-135m-embed   # the fast chat model most tests use; the embed entry links its file

# Every dependency as a wheel, once, for tests/test_install.py (a fresh venv installs from it with no network).
wheelhouse: $(WHEELHOUSE)/.complete
$(WHEELHOUSE)/.complete: pyproject.toml scripts/wheelhouse.py | $(STAMP)
	$(PY) scripts/wheelhouse.py $(WHEELHOUSE)
	touch $@

# Chromium from the system packages, for the playground's browser tests (tests/test_playground.py drives it with
# Playwright, installed by the test extras; no browser is ever downloaded). Silent when it is already there; where
# it cannot be installed, those tests skip and say why.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { command -v apt-get >/dev/null && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq chromium >/dev/null 2>&1; }; }; } || echo "note: Chromium could not be installed;" \
	  "the playground's browser tests will be skipped"

demo: models
	$(PY) -m polargrid_local demo

test: models wheelhouse browser
	$(PY) -m pytest $(PYTEST_ARGS)

# The hostile-input suites (hostile clients, a hostile upstream) with many more Hypothesis examples than CI runs.
fuzz: models
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests/test_hostile_http.py tests/test_hostile_upstream.py -s $(PYTEST_ARGS)

bench: models
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) benchmarks/bench_text.py
	$(PY) benchmarks/bench_audio.py
	$(PY) benchmarks/bench_http.py
	$(PY) benchmarks/bench_batch.py
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_rerank.py

# ruff (lint, import order), mypy, and the import rules: layers (import-linter) and no module-level circles.
lint: install
	$(PY) -m ruff check polargrid_local kernels
	$(PY) -m mypy polargrid_local kernels
	$(VENV)/bin/lint-imports
	$(PY) scripts/import_graph.py --check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
