#!/usr/bin/env bash
# Builds the local stand-in for the Dockerfile's base image: Debian bookworm
# with python3.11 and venv, from a debootstrap rootfs, imported into podman.
#
# For machines that cannot pull from a container registry (our CI). Real
# clusters build FROM the pinned python:3.11-slim-bookworm tag instead (see
# images/Dockerfile). The rootfs tarball is cached under $SKIN_IMAGE_CACHE, so
# only the first run pays for debootstrap; a podman image already imported
# from the same tarball is left alone.
#
#   images/build-base.sh [IMAGE]       (default: localhost/skin-base:bookworm-py311)
set -euo pipefail

IMAGE=${1:-${BASE_IMAGE:-localhost/skin-base:bookworm-py311}}
SUITE=bookworm
# python3-venv brings ensurepip; ca-certificates lets pip and google-cloud-storage speak TLS.
PACKAGES=python3,python3-venv,ca-certificates,tzdata
CACHE_DIR=${SKIN_IMAGE_CACHE:-$HOME/.cache/skin-image}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

log() { printf '[build-base] %s\n' "$*" >&2; }

# The Debian mirror apt already uses (deb822 .sources or one-line sources.list).
debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local m
  m=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}';
         grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
           | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; break}}'; } \
       | grep -E '/debian/?$' | head -n1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

MIRROR=$(debian_mirror)
# The cache key changes whenever what goes into the rootfs changes.
KEY=$(printf '%s\n' "$SUITE" "$PACKAGES" "$(sha256sum "$0" | cut -c1-16)" | sha256sum | cut -c1-12)
TARBALL="$CACHE_DIR/$SUITE-python3.11-$KEY.tar"

if [ "$(podman image inspect --format '{{ index .Labels "skin.base.key" }}' "$IMAGE" 2>/dev/null || true)" = "$KEY" ]; then
  log "$IMAGE is up to date (key $KEY)"
  exit 0
fi

if [ ! -s "$TARBALL" ]; then
  command -v debootstrap >/dev/null || { log "debootstrap is not installed (make system-deps)"; exit 1; }
  mkdir -p "$CACHE_DIR"
  ROOTFS=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
  trap '$SUDO rm -rf "$ROOTFS"' EXIT
  log "debootstrap $SUITE from $MIRROR (once; cached as $TARBALL)"
  $SUDO debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >&2
  # What an image does not need: package caches, docs, man pages, apt lists.
  $SUDO rm -rf "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
    "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* \
    "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/log/*.log "$ROOTFS"/var/log/apt/* \
    "$ROOTFS"/dev/* "$ROOTFS"/proc/* "$ROOTFS"/sys/*
  # An apt source inside the image, so `apt-get update` works there too.
  echo "deb $MIRROR $SUITE main" | $SUDO tee "$ROOTFS/etc/apt/sources.list" >/dev/null
  $SUDO tar --numeric-owner -C "$ROOTFS" -cf "$TARBALL.part" .
  $SUDO chown "$(id -u):$(id -g)" "$TARBALL.part"
  mv "$TARBALL.part" "$TARBALL"
  # Older tarballs of other keys are dead weight.
  find "$CACHE_DIR" -maxdepth 1 -name "$SUITE-python3.11-*.tar" ! -name "$(basename "$TARBALL")" -delete
else
  log "using cached rootfs $TARBALL"
fi

log "importing $TARBALL as $IMAGE"
podman import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change "LABEL skin.base.key=$KEY" \
  --change 'CMD ["python3"]' \
  "$TARBALL" "$IMAGE" >/dev/null
log "built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec))"
