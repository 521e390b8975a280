# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed
RUN = demo-run

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: 2.13.0 resolves to the local CPU wheel, never the multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# extract -> shortlist -> rerank -> evaluate (and its results page) on the bundled demo
# benchmark, offline
demo: $(STAMP)
	$(BIN)/elvis extract examples/data/demo/jpg -o $(RUN)/feats.h5
	$(BIN)/elvis shortlist --features $(RUN)/feats.h5 -k 100 -o $(RUN)/shortlist.npz
	$(BIN)/elvis rerank --features $(RUN)/feats.h5 --candidates $(RUN)/shortlist.npz \
		--shortlist 100 -o $(RUN)/reranked.csv --show 1
	$(BIN)/elvis evaluate --data-root examples/data --dataset demo \
		--shortlist 0 25 50 100 --out-dir $(RUN) --report

# tests/test_report.py opens a results page in headless Chromium (Debian's package): installed
# here when missing where apt-get runs as root; elsewhere that test skips, saying why
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] \
		&& command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && apt-get install -y -qq chromium; } \
		|| echo "make: no chromium (installed only by apt-get as root): the browser test skips"

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The suite on the code path of an AVX2-only CPU (torch, MKL, oneDNN, numba, numpy), on any
# x86-64 CPU
test-avx2: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
		NUMBA_CPU_NAME=haswell NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" \
		$(BIN)/python -m pytest

.PHONY: install browser demo test test-avx2
