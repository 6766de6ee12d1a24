#!/usr/bin/env bash
# The prepared GPU check of bench/gpu_bench.py and the CUDA tests, for one `run` of the device tool on a lent
# H100/H200 (Python 3.12 with torch, torchaudio, pyarrow and pytest; no PyAV, soxr, demo renderer or internet).
#
#   bash bench/device_check.sh prepare      here: wheels into .whl/, the converted musicnn weights into .carry/
#   device run: command "bash bench/device_check.sh", carry [".whl", ".carry"], timeout_s 590 (its timeouts end it within 530 s)
#   DEVICE=cpu PYTHON=.venv/bin/python TRACKS=4 SECONDS_PER_TRACK=30 BENCH_ARGS=--no-compile \
#     bash bench/device_check.sh            here, without a GPU: checks the script itself (77 s)
#
# What travels is about 48 MB (PyAV 36, the demo renderer's SoundFont 6, musicnn's weights 6). deltalake (52 MB)
# does not fit beside PyAV, so the bench's run_embed sections are skipped there; its "loop" section measures the
# local runner's loop without tables. Results (logs and JSON) land in $OUT (bench/results/device here).
set -u -o pipefail

WHEELS=(av==18.1.0 soxr==1.1.0 pretty_midi==0.2.11.post0 tinysoundfont==0.3.7 mido==1.3.3 importlib_resources==7.1.0)

if [ "${1:-}" = prepare ]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}" || exit 1
  mkdir -p .carry/cache
  cp -r "${CATALOG_EMBED_CACHE:-$HOME/.cache/catalog-embed}/musicnn" .carry/cache/ || exit 1
  du -sh .whl .carry
  exit 0
fi

PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
TRACKS=${TRACKS:-48}
SECONDS_PER_TRACK=${SECONDS_PER_TRACK:-120}
BENCH_ARGS=${BENCH_ARGS:-}
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
# The code imports as catalog_embed.* (pyproject.toml maps the top-level folders there) and nothing is installed on
# the device machine: a folder of links gives the same namespace; $PWD gives the tests their `tests.helpers`.
NAMESPACE=$(mktemp -d)
mkdir "$NAMESPACE/catalog_embed"
for package in pipelines workers schemas; do ln -s "$PWD/$package" "$NAMESPACE/catalog_embed/$package"; done
export PYTHONUNBUFFERED=1 PYTHONPATH=$NAMESPACE:$PWD
if [ "$DEVICE" != cpu ]; then
  export CATALOG_EMBED_CACHE=$PWD/.carry/cache  # the weights travel: no internet there
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
fi

# The CUDA tests (marked gpu; skipped without a GPU), then one bench per encoder and precision the issue names.
timeout 90 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/workers 2>&1 | tee "$OUT/gpu_tests.log"
for run in "mule-sfnfnet-f0 bf16" "musicnn-msd bf16" "musicnn-msd fp32"; do
  read -r model precision <<< "$run"
  # shellcheck disable=SC2086 # BENCH_ARGS: several words
  timeout 140 "$PYTHON" bench/gpu_bench.py --device "$DEVICE" --model "$model" --precision "$precision" \
    --tracks "$TRACKS" --seconds "$SECONDS_PER_TRACK" --repeat 3 --no-ray --no-cold-warm $BENCH_ARGS 2>&1 \
    | grep -v ' INFO ' | tee "$OUT/gpu_bench-$model-$precision.log"
  cp "bench/results/gpu_bench-${DEVICE%%:*}.json" "$OUT/gpu_bench-$model-$precision.json"
done
