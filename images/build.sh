#!/usr/bin/env bash
# Build the three images from the repo root with whichever builder this machine has:
# docker (with a reachable daemon), podman or buildah. REGISTRY, TAG, PUSH=1 (push after build),
# BUILDER=docker|podman|buildah to choose, IMAGES="server operator" to build fewer.
set -euo pipefail
cd "$(dirname "$0")/.."
REGISTRY=${REGISTRY:-loraplex}
TAG=${TAG:-dev}
IMAGES=${IMAGES:-server server-cpu operator}

usable() {
    case "$1" in
        docker) command -v docker >/dev/null && docker info >/dev/null 2>&1 ;;
        podman | buildah) command -v "$1" >/dev/null ;;
        *) return 1 ;;
    esac
}

pick_builder() {
    if [ -n "${BUILDER:-}" ]; then
        usable "$BUILDER" && { echo "$BUILDER"; return; }
        echo "make images: BUILDER=$BUILDER is not usable here" >&2
        return 1
    fi
    for candidate in docker podman buildah; do
        usable "$candidate" && { echo "$candidate"; return; }
    done
    local hint=""
    command -v docker >/dev/null && hint=" (a docker client is installed but its daemon does not answer: docker info)"
    echo "make images: no image builder found: install docker, podman or buildah$hint." >&2
    echo "On GCP without one, docs/gke-autopilot.md builds with: gcloud builds submit --config images/cloudbuild.yaml" >&2
    return 1
}

builder=$(pick_builder)
for image in $IMAGES; do
    ref="$REGISTRY/$image:$TAG"
    echo "== $builder: $ref from images/$image.Dockerfile"
    case "$builder" in
        buildah) buildah bud --layers -f "images/$image.Dockerfile" -t "$ref" . ;;
        *) "$builder" build -f "images/$image.Dockerfile" -t "$ref" . ;;
    esac
    if [ "${PUSH:-}" = 1 ]; then
        "$builder" push "$ref"
    fi
done
