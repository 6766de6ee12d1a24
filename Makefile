# The two commands in the README: `make demo` and `make test`. Both set up .venv first (Python 3.11).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
TRACKS ?= 240

.PHONY: setup demo probe-demo test bench lock clean

setup: $(VENV)/.installed

# The exact versions of requirements.lock (hash-checked), then the package itself without resolving anything:
# pyproject.toml's ranges are for installing beside other software, the lock is what CI and `make` test.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==26.3
	$(BIN)/pip install --quiet --requirement requirements.lock
	$(BIN)/pip install --quiet --no-deps --editable .
	# tinysoundfont renders the demo catalog; its PyAudio dependency is for playback only and needs PortAudio.
	$(BIN)/pip install --quiet --no-deps tinysoundfont==0.3.7
	touch $@

# Regenerate requirements.lock after a change to pyproject.toml's dependencies (needs uv: `pip install uv`). Pins
# that still fit the ranges are kept; move one with UPGRADE="--upgrade-package numpy", all with UPGRADE=--upgrade.
LOCK_FLAGS := --extra test --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header
define LOCK_HEADER
# requirements.lock: what `make setup` installs (and so CI tests), for CPython 3.11 on Linux x86_64: the
# dependencies of pyproject.toml's [test] extra (the package, its optional extras but [dataflow], the test tools)
# at exact versions, with the sha256 of every file the index has for them (pip then checks every download).
# Why this format: any pip installs it (`pip install -r requirements.lock`); pylock.toml is experimental in pip
# 26.3 and unknown to the pip a fresh venv brings. pyproject.toml keeps version ranges, for installing beside
# other software; this file keeps `make` reproducible. The Python 3.12/3.13 legs of .ci/run use it as constraints.
# Do not edit: regenerate with `make lock` (needs uv), which runs
#   uv pip compile pyproject.toml $(LOCK_FLAGS) $$UPGRADE --output-file requirements.lock
# keeping every pin that still fits the ranges (UPGRADE="--upgrade-package numpy" moves one, --upgrade all).
# tinysoundfont (the demo's renderer) is not here: the Makefile installs it with --no-deps.
endef
export LOCK_HEADER
lock:
	uv pip compile --quiet pyproject.toml $(LOCK_FLAGS) $(UPGRADE) --output-file requirements.lock
	{ printf '%s\n' "$$LOCK_HEADER"; cat requirements.lock; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

$(DEMO)/catalog/manifest.parquet: | setup
	$(BIN)/catalog-embed demo-catalog $(DEMO)/catalog --tracks $(TRACKS)

demo: setup $(DEMO)/catalog/manifest.parquet
	$(BIN)/catalog-embed embed --catalog $(DEMO)/catalog/manifest.parquet --out $(DEMO)/tables
	$(BIN)/catalog-embed query --out $(DEMO)/tables --allow-files \
	  "SELECT l.instrument_family, count(*) AS tracks, round(avg(e.n_windows), 1) AS windows, \
	          round(sum(e.duration_s) / 60, 1) AS minutes \
	   FROM embeddings e JOIN '$(DEMO)/catalog/labels.parquet' l USING (track_id) \
	   GROUP BY 1 ORDER BY 1"
	$(BIN)/catalog-embed query --out $(DEMO)/tables "SELECT track_id, error_type, message FROM failures ORDER BY 1"

# The README's probe results: embed the demo catalog with every model, then probe each on its three tasks.
probe-demo: demo
	for model in musicnn-mtt mfcc-stats chroma-stats; do \
	  $(BIN)/catalog-embed embed --catalog $(DEMO)/catalog/manifest.parquet --out $(DEMO)/tables --model $$model || exit 1; \
	done
	$(BIN)/python bench/probe_demo.py --tables $(DEMO)/tables --labels $(DEMO)/catalog/labels.parquet --out $(DEMO)/probes

test: setup
	$(BIN)/python -m pytest -n 2 -q

bench: setup
	$(BIN)/python bench/embed_bench.py

clean:
	rm -rf $(DEMO) bench/results .pytest_cache
