#!/usr/bin/env bash
# Builds the skin image (images/Dockerfile) from the repository root.
#
#   images/build.sh IMAGE_REF [TARGET]      TARGET: runtime (default), emulator, or
#                                           fake-gcs-server (images/fake-gcs-server.Dockerfile)
#
# Environment:
#   IMAGE_BASE        debootstrap (default): the local base from images/build-base.sh,
#                     no registry needed; registry: the Dockerfile's pinned
#                     python:3.11-slim-bookworm; anything else: that image.
#   TF_VARIANT        cpu (default) or gpu
#   CONTAINER_TOOL    podman (default) or docker
#   PIP_CA_BUNDLE     CA bundle handed to pip as the build secret `pip-ca`
#                     (default: PIP_CERT, pip's `cert` setting, else the host's
#                     /etc/ssl/certs/ca-certificates.crt)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE_REF=${1:?usage: images/build.sh IMAGE_REF [runtime|emulator|fake-gcs-server]}
TARGET=${2:-runtime}
DOCKERFILE=images/Dockerfile
if [ "$TARGET" = fake-gcs-server ]; then
  DOCKERFILE=images/fake-gcs-server.Dockerfile; TARGET=
fi
IMAGE_BASE=${IMAGE_BASE:-debootstrap}
TF_VARIANT=${TF_VARIANT:-cpu}
TOOL=${CONTAINER_TOOL:-podman}
LOCAL_BASE=localhost/skin-base:bookworm-py311

args=(-f "$DOCKERFILE" ${TARGET:+--target "$TARGET"} --build-arg "TF_VARIANT=$TF_VARIANT" -t "$IMAGE_REF")
case "$IMAGE_BASE" in
  debootstrap) images/build-base.sh "$LOCAL_BASE"; args+=(--build-arg "BASE_IMAGE=$LOCAL_BASE") ;;
  registry) ;;
  *) args+=(--build-arg "BASE_IMAGE=$IMAGE_BASE") ;;
esac

# Behind a TLS-intercepting proxy pip needs its CA bundle; it travels as a
# secret, so it is never stored in a layer.
ca=${PIP_CA_BUNDLE:-${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}}
ca=${ca:-/etc/ssl/certs/ca-certificates.crt}   # the host's trust store: public certificates only
if [ -n "$ca" ] && [ -s "$ca" ]; then
  args+=(--secret "id=pip-ca,src=$ca")
fi
if [ "$TOOL" = podman ]; then
  # The layer cache is what makes a rebuild after a source change take seconds.
  args+=(--layers)
fi

echo "[build] $TOOL build ${args[*]} ." >&2
start=$SECONDS
"$TOOL" build "${args[@]}" .
echo "[build] $IMAGE_REF (${TARGET:-$DOCKERFILE}, $TF_VARIANT) built in $((SECONDS - start)) s" >&2
