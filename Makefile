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

# extract -> shortlist -> rerank -> evaluate on the bundled demo benchmark, offline
demo: $(STAMP)
	$(BIN)/elvis extract examples/data/demo/jpg -o $(RUN)/feats.h5
	$(BIN)/elvis shortlist --features $(RUN)/feats.h5 -k 100 -o $(RUN)/shortlist.npz
	$(BIN)/elvis rerank --features $(RUN)/feats.h5 --candidates $(RUN)/shortlist.npz \
		--shortlist 100 -o $(RUN)/reranked.csv --show 1
	$(BIN)/elvis evaluate --data-root examples/data --dataset demo \
		--shortlist 0 25 50 100 --out-dir $(RUN)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The suite on the code path of an AVX2-only CPU (torch, MKL, oneDNN, numba), on any x86-64 CPU
test-avx2: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
		NUMBA_CPU_NAME=haswell $(BIN)/python -m pytest

.PHONY: install demo test test-avx2
