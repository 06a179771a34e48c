# The two quick-start commands (README): both set everything up first (scripts/setup.sh, safe to re-run).
PY := .venv/bin/python

.PHONY: setup demo test test-slow
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m jaxrlhf.ppo --mesh 4x2

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow
