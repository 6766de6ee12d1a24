# syntax=docker/dockerfile:1.7
# The nightly CronJob's image (nightly-cronjob.yaml): kubectl and nothing else. Built by us: the public kubectl
# images it used vanished (bitnami/kubectl's versioned tags, 2025). kubectl is the Kubernetes release binary,
# checked against its sha256 at build time; the image is distroless (no shell, no package manager, non-root).
#
#   docker build -f infra/kuberay/kubectl.Dockerfile -t "$REGISTRY/kubectl:v1.36.1" infra/kuberay
#   docker push "$REGISTRY/kubectl:v1.36.1"
#
# Keep kubectl within one minor version of the cluster's Kubernetes. Another release: pass both arguments,
#   --build-arg KUBECTL_VERSION=vX.Y.Z \
#   --build-arg KUBECTL_SHA256="$(curl -fsSL https://dl.k8s.io/release/vX.Y.Z/bin/linux/amd64/kubectl.sha256)"
# and give the CronJob the new tag. linux/amd64 only (the sha256 is the amd64 binary's).

FROM busybox:1.37 AS verified
ARG KUBECTL_VERSION=v1.36.1
ARG KUBECTL_SHA256=629d3f410e09bf49b64ae7079f7f0bda1191efed311f7d37fdbab0ad5b0ec2b7
ADD https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/amd64/kubectl /kubectl
RUN printf '%s  %s\n' "${KUBECTL_SHA256}" /kubectl > /kubectl.sha256 \
 && sha256sum -c /kubectl.sha256 \
 && chmod 0755 /kubectl

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=verified /kubectl /usr/local/bin/kubectl
# numeric, so that Kubernetes can check runAsNonRoot (distroless names this uid "nonroot")
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kubectl"]
