#!/usr/bin/env bash
# `make e2e-kind`: the e2e suite on a kind cluster (needs docker, kind and helm on PATH).
# Builds the server-cpu and operator images, loads them into kind, installs the chart with them,
# and runs `pytest e2e` through a port-forward. The pods must fetch the model and adapters
# themselves, so LORAPLEX_E2E_MANIFESTS names a folder with base-model.yaml, adapters.yaml and
# adapter-live.yaml using hub ids (e2e/README.md); e2e/demo/ uses local paths kind can't read.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LORAPLEX_E2E_MANIFESTS:?set it to a folder of hub-backed manifests (see e2e/README.md)}"
CLUSTER=${KIND_CLUSTER:-loraplex-e2e}
TAG=${TAG:-e2e}
PYTHON=${PYTHON:-.venv/bin/python}

if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --config e2e/kind.yaml
fi
docker build -f images/server-cpu.Dockerfile -t "loraplex-server-cpu:$TAG" .
docker build -f images/operator.Dockerfile -t "loraplex-operator:$TAG" .
kind load docker-image --name "$CLUSTER" "loraplex-server-cpu:$TAG" "loraplex-operator:$TAG"

KUBECONFIG=$(mktemp)
export KUBECONFIG
trap 'rm -f "$KUBECONFIG"' EXIT
kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"
helm upgrade --install loraplex helm/loraplex -n loraplex-system --create-namespace \
  --set operator.image.repository=loraplex-operator --set operator.image.tag="$TAG" \
  --set serverImage.repository=loraplex-server-cpu --set serverImage.tag="$TAG" --wait
LORAPLEX_E2E_ACCESS=port-forward "$PYTHON" -m pytest e2e -v "$@"
