#!/usr/bin/env bash
# Build a minimal Debian bookworm base image with debootstrap, for hosts that cannot pull from a
# registry (our CI). Pass it to the builds: LAB_CPU_BASE_IMAGE=lab/debian-base:bookworm.
# Usage: docker/debian-base.sh [TAG] [MIRROR]     (needs root, debootstrap and a Docker engine)
set -euo pipefail
tag=${1:-lab/debian-base:bookworm}
mirror=${2:-http://deb.debian.org/debian}
if docker image inspect "$tag" >/dev/null 2>&1; then echo "debian-base: $tag exists"; exit 0; fi
root=$(mktemp -d)
chmod 755 "$root"  # mktemp makes it 0700: the image's / would shut out non-root users
trap 'rm -rf "$root"' EXIT
# No python3-venv (so no ensurepip), as in the pytorch/pytorch CUDA images: CI's builds then prove
# the images make their venvs without it (docker/install.sh: venv --without-pip).
debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates \
  bookworm "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$tag" >/dev/null
echo "debian-base: built $tag"
