# Two commands for a fresh Debian/Ubuntu machine (as root): `make demo` and `make test`.
VENV := .venv
PYTHON ?= python3

.PHONY: demo test system-deps venv

system-deps:
	@scripts/system-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: system-deps venv
	scripts/demo.sh

test: system-deps venv
	$(VENV)/bin/python -m pytest -q
