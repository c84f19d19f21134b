# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when it is missing (`make venv` does only that).
PYTHON ?= python3
VENV ?= .venv
# torch is installed first, pinned: on a CPU box 2.13.0 is a CPU build, while an open range
# would pull a multi-GB CUDA build. On a GPU box: make venv TORCH=torch
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv lint test stress test-cuda demo bench smollm2 clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# ruff's settings are in pyproject.toml; `ruff format .` fixes what format --check reports
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The tests marked `dtype` leave the dtype at `auto`, which follows the cpu: they run as a cpu where bfloat16
# is native and faster would choose and as one without (REGMEAN_CPU_BF16=1, 0), so that a test passing on one kind only
# fails on both, whichever CI was given (about 1.5 min more). The float32 numerics (tests/conftest.py NUMERICS)
# run again under torch's portable kernels on one thread and its avx2 kernels on two, which round and sum in
# other orders than the cpu's own: a check that holds by one cpu's rounding fails here on every cpu (~5 min more).
test: venv
	$(PY) -m pytest -q -m "not dtype" tests
	REGMEAN_CPU_BF16=1 $(PY) -m pytest -q -m dtype tests
	REGMEAN_CPU_BF16=0 $(PY) -m pytest -q -m dtype tests
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "numerics and not bf16 and not dtype" tests
	ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=2 $(PY) -m pytest -q -m "numerics and not bf16 and not dtype" tests

# the long checks left out of `make test`: 25 two-process gram runs beside a CPU load (~10 min)
stress: venv
	$(PY) -m pytest -q -s -m stress tests

test-cuda: venv
	$(PY) -m pytest -q -m cuda tests/test_cuda.py

demo: venv
	$(PY) demo.py

smollm2: venv
	$(PY) smollm2.py

bench: venv
	$(PY) bench/bench_gram.py
	$(PY) bench/bench_merge.py

clean:
	rm -rf runs/demo runs/toy runs/toy-quick .pytest_cache
