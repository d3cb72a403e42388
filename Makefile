# `make demo` runs the main job, `make test` the test suite; both create .venv on first use.
PY := .venv/bin/python
DEMO_ARGS ?=

.venv/installed: requirements.txt pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --no-cache-dir -r requirements.txt
	$(PY) -m pip install -q --no-cache-dir --no-build-isolation --no-deps -e .
	touch $@

install: .venv/installed

demo: .venv/installed
	PATH=$(CURDIR)/.venv/bin:$$PATH bash run_all.sh --quick $(DEMO_ARGS)

test: .venv/installed
	$(PY) -m pytest

.PHONY: install demo test
