# Two entry points, each doing all the set-up on a fresh machine:
#   make demo   - create .venv if missing, install, run the end-to-end demo
#   make test   - same install, lint (ruff, mypy on pipeline/), run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install

.PHONY: install demo test lint bench rehearse check-promises clean

# Re-installs only when pyproject.toml changes: a second `make` costs nothing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	# facenet-pytorch's metadata pins torch<2.3 and numpy<2, which cannot resolve; its code
	# and shipped MTCNN weights work unchanged with the pinned torch, so skip its deps.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps facenet-pytorch==2.6.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py

test: install
	$(BIN)/ruff check pipeline serve actors scripts tests
	$(BIN)/mypy pipeline
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check pipeline serve actors scripts tests
	$(BIN)/mypy pipeline

bench: install
	$(BIN)/python scripts/bench_service.py --quick
	$(BIN)/python scripts/bench_models.py --quick
	$(BIN)/python scripts/bench_video.py --quick
	$(BIN)/python scripts/bench_scale.py --quick
	$(BIN)/python scripts/bench_hostile.py
	$(BIN)/python scripts/load.py --quick
	$(BIN)/python scripts/bench_retention.py
	$(BIN)/python scripts/bench_transparency.py --quick

# Every privacy promise broken one at a time: a named guard test must fail on an assertion.
check-promises: install
	$(BIN)/python scripts/check_promises.py

# A multi-node cluster on this machine (cluster.yaml's node types, Ray's autoscaler).
rehearse: install
	$(BIN)/python scripts/rehearse_cluster.py

clean:
	rm -rf data out bench-out models
