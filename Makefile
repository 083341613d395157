# Two entry points for a fresh machine: `make demo` and `make test`.
# Each builds .venv on first use. On a machine without an NVIDIA GPU the CPU build of torch is
# installed (never the multi-GB CUDA build); with a GPU, the default (CUDA) build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the default torch build"; \
		$(PY) -m pip install -q "torch>=2.6"; \
	else \
		echo "no GPU: installing the CPU build torch==$(TORCH_CPU_VERSION)"; \
		index=""; \
		if $(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" 2>/dev/null; \
		then index="--extra-index-url $(TORCH_CPU_INDEX)"; fi; \
		$(PY) -m pip install -q "torch==$(TORCH_CPU_VERSION)" $$index; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/kha demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info
