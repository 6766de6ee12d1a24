#!/usr/bin/env bash
# Create (or update) the Cloud Scheduler job that launches the Flex Template every night at 02:00 UTC.
# Each launch plans against the tables, so a night embeds only what changed since the last run.
#
#   PROJECT=my-project REGION=us-central1 BUCKET=my-bucket \
#   SCHEDULER_SA=catalog-embed-scheduler@my-project.iam.gserviceaccount.com infra/dataflow/nightly.sh
#
# SCHEDULER_SA needs roles/dataflow.developer and roles/iam.serviceAccountUser on the Dataflow worker account.
set -euo pipefail

export PROJECT="${PROJECT:?set PROJECT}" REGION="${REGION:?set REGION}" BUCKET="${BUCKET:?set BUCKET}"
export TAG="${TAG:-0.1.0}"
SCHEDULER_SA="${SCHEDULER_SA:?set SCHEDULER_SA to the service account Cloud Scheduler calls Dataflow as}"
BODY="$(mktemp)"
trap 'rm -f "${BODY}"' EXIT
# shellcheck disable=SC2016 # envsubst takes the names of the variables to replace, unexpanded
envsubst '${PROJECT} ${REGION} ${BUCKET} ${TAG}' < infra/dataflow/launch-body.json > "${BODY}"

# `create` takes --headers, `update` --update-headers; the rest is the same.
if gcloud scheduler jobs describe catalog-embed-nightly --project "${PROJECT}" --location "${REGION}" >/dev/null 2>&1; then
  ACTION=(update http catalog-embed-nightly --update-headers "Content-Type=application/json")
else
  ACTION=(create http catalog-embed-nightly --headers "Content-Type=application/json")
fi
gcloud scheduler jobs "${ACTION[@]}" \
  --project "${PROJECT}" \
  --location "${REGION}" \
  --schedule "0 2 * * *" \
  --time-zone "Etc/UTC" \
  --uri "https://dataflow.googleapis.com/v1b3/projects/${PROJECT}/locations/${REGION}/flexTemplates:launch" \
  --http-method POST \
  --oauth-service-account-email "${SCHEDULER_SA}" \
  --message-body-from-file "${BODY}"
