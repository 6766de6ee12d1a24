# The two commands in the README: `make demo` and `make test`. Both set up .venv first (Python 3.11).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
TRACKS ?= 240

.PHONY: setup demo probe-demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	# tinysoundfont renders the demo catalog; its PyAudio dependency is for playback only and needs PortAudio.
	$(BIN)/pip install --quiet --no-deps tinysoundfont==0.3.7
	touch $@

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
