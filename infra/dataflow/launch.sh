#!/usr/bin/env bash
# Build the images, the Dataflow Flex Template, and launch one run of it.
#
#   PROJECT=my-project REGION=us-central1 BUCKET=my-bucket infra/dataflow/launch.sh build   # images + template
#   PROJECT=my-project REGION=us-central1 BUCKET=my-bucket infra/dataflow/launch.sh run     # one run
#
# Needs gcloud (authenticated), docker with buildx, and an Artifact Registry repository named catalog-embed.
set -euo pipefail

PROJECT="${PROJECT:?set PROJECT to the Google Cloud project}"
REGION="${REGION:?set REGION, e.g. us-central1}"
BUCKET="${BUCKET:?set BUCKET to a gs bucket name (no gs://)}"
TAG="${TAG:-0.1.0}"
REPO="${REGION}-docker.pkg.dev/${PROJECT}/catalog-embed"
IMAGE="${REPO}/worker:${TAG}"
LAUNCHER_IMAGE="${REPO}/launcher:${TAG}"
TEMPLATE="gs://${BUCKET}/templates/catalog-embed-${TAG}.json"

case "${1:-}" in
  build)
    docker build -f infra/Dockerfile --target worker -t "${IMAGE}" .
    docker build -f infra/Dockerfile --target launcher -t "${LAUNCHER_IMAGE}" .
    docker push "${IMAGE}"
    docker push "${LAUNCHER_IMAGE}"
    gcloud dataflow flex-template build "${TEMPLATE}" \
      --project "${PROJECT}" \
      --image "${LAUNCHER_IMAGE}" \
      --sdk-language PYTHON \
      --metadata-file infra/dataflow/metadata.json
    ;;
  run)
    # gcloud splits --parameters on commas; '^~^' makes '~' the separator, since the accelerator holds ';'.
    # Right fitting: the GPU machine is named in the accelerator, which only the encode step asks for; the worker
    # machine type is the CPU workers' that decode (infra/README.md, "GPUs for the encode step only").
    gcloud dataflow flex-template run "catalog-embed-$(date -u +%Y%m%d-%H%M%S)" \
      --project "${PROJECT}" \
      --region "${REGION}" \
      --template-file-gcs-location "${TEMPLATE}" \
      --temp-location "gs://${BUCKET}/tmp" \
      --staging-location "gs://${BUCKET}/staging" \
      --worker-machine-type n2-highcpu-16 \
      --max-workers 8 \
      --additional-experiments use_runner_v2 \
      --parameters "^~^catalog=gs://${BUCKET}/catalog/manifest.parquet~out=gs://${BUCKET}/tables~sdk_container_image=${IMAGE}~device=cuda~worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver;machine_type:g2-standard-8~batch_windows=256"
    ;;
  *)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
