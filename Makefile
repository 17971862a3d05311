# The two commands of the README: `make demo` and `make test`.
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml scripts/setup.sh scripts/llamacpp.sh
	bash scripts/setup.sh
	touch $(STAMP)

.PHONY: setup demo test test-slow test-rebuild
setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorablend demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow

test-rebuild: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m rebuild
