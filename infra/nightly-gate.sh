#!/usr/bin/env bash
# A nightly run with a gate: embed the catalog into a candidate root first, compare the candidate with the live
# rows, and embed into the live tables only when every gate passes. A new encoder version that moved the space
# too far (or broke) stops here, before it replaces the catalog's rows; its report stays under REPORT.
#
#   CATALOG=gs://my-bucket/catalog/manifest.parquet OUT=gs://my-bucket/tables \
#   CANDIDATE_OUT=gs://my-bucket/tables-candidate MODEL=musicnn-msd \
#   infra/nightly-gate.sh --runner ray --address auto --device cuda
#
# Extra arguments go to both `catalog-embed embed` calls (runner, device, workers). Each run is incremental: on
# a night without a new encoder version both embed only what changed in the catalog. Exit codes: 0 promoted,
# 1 a gate failed (live tables untouched), anything else an error. The first night, when the live tables hold no
# rows of MODEL yet, embed into OUT by hand once.
set -euo pipefail

CATALOG="${CATALOG:?set CATALOG to the manifest URI}"
OUT="${OUT:?set OUT to the live tables root}"
CANDIDATE_OUT="${CANDIDATE_OUT:?set CANDIDATE_OUT to a root for the candidate tables}"
MODEL="${MODEL:-musicnn-msd}"
MIN_OVERLAP="${MIN_OVERLAP:-0.6}"   # mean share of each track's 10 nearest neighbours that stay its neighbours
MIN_CKA="${MIN_CKA:-0.8}"           # linear CKA between the live and the candidate vectors
REPORT="${REPORT:-gate-report}"
# The command to run; tests point it at the working tree (`python -m catalog_embed.pipelines.cli`).
read -r -a CLI <<< "${CATALOG_EMBED:-catalog-embed}"

"${CLI[@]}" embed --catalog "${CATALOG}" --out "${CANDIDATE_OUT}" --model "${MODEL}" "$@"
"${CLI[@]}" compare --out "${OUT}" --b-out "${CANDIDATE_OUT}" --a "${MODEL}" --b "${MODEL}" \
  --fail-under "overlap=${MIN_OVERLAP}" --fail-under "cka=${MIN_CKA}" --report "${REPORT}"
# The promoting run packs the small files its merge left and checkpoints the logs (`catalog-embed maintain`), so
# files per table and log replay stay flat over the nights; the candidate root is rebuilt by every run's merge alone.
"${CLI[@]}" embed --catalog "${CATALOG}" --out "${OUT}" --model "${MODEL}" --maintain-target-mb 100 "$@"
