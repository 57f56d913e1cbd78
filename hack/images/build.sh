#!/usr/bin/env bash
# Build the project's images here, with no Docker engine: buildah (daemonless,
# chroot isolation) builds images/*.Dockerfile as written; prints each image's name.
#   hack/images/build.sh [operator] [trainer-cuda] [trainer-cpu]   # none: the builder and base only
#
# Docker Hub is out of reach here, so BASE is a stand-in for python:3.11-slim-bookworm
# built once with debootstrap from Debian's packages (bookworm's python3 is 3.11) and
# cached under ~/.cache/dtj/images. buildah and debootstrap come from Debian's packages:
# this script installs them with apt-get when they are missing. The host's CA bundle
# is mounted into RUN steps so pip works behind a TLS-intercepting proxy.
# trainer-cpu needs PyTorch's CPU index (download.pytorch.org); trainer-cuda takes
# torch from PyPI (several GB).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/dtj/images"
mkdir -p "$cache"
suite=bookworm
base="localhost/dtj-base:$suite-python3"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml" | head -1)

if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  echo "Installing buildah and debootstrap from Debian's packages (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q buildah debootstrap >&2
fi
B=(bash "$root/hack/images/buildah.sh")

if ! "${B[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  echo "Building the base image $base with debootstrap (once; cached in $cache)" >&2
  rootfs=$(mktemp -d "$cache.rootfs.XXXX")
  trap 'rm -rf "$rootfs"' EXIT
  if ! debootstrap --variant=minbase --include=python3,python3-pip "$suite" "$rootfs" \
    http://deb.debian.org/debian >"$cache.debootstrap.log" 2>&1; then
    tail -20 "$cache.debootstrap.log" >&2; exit 1
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  ctr=$("${B[@]}" from scratch)
  cp -a "$rootfs/." "$("${B[@]}" mount "$ctr")/"
  "${B[@]}" umount "$ctr" >/dev/null
  # Debian marks its python3 externally managed (PEP 668); an image owns its Python.
  "${B[@]}" config --env PIP_BREAK_SYSTEM_PACKAGES=1 --env LANG=C.UTF-8 --cmd python3 "$ctr"
  "${B[@]}" commit --quiet "$ctr" "$base" >/dev/null
  "${B[@]}" rm "$ctr" >/dev/null
fi

ca=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  ca=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
fi
for target in "$@"; do
  case $target in
    operator) file=operator.Dockerfile; stage=(); tag="localhost/dtj-operator:$version" ;;
    trainer-cpu|trainer-cuda)
      file=trainer.Dockerfile; stage=(--target "${target#trainer-}")
      tag="localhost/dtj-trainer:$version-${target#trainer-}" ;;
    *) echo "error: unknown image $target (operator, trainer-cpu, trainer-cuda)" >&2; exit 2 ;;
  esac
  echo "Building $tag from images/$file with buildah" >&2
  start=$(date +%s)
  "${B[@]}" bud --quiet --isolation chroot "${ca[@]}" --build-arg "BASE=$base" "${stage[@]}" \
    -f "$root/images/$file" -t "$tag" "$root" >&2
  echo "$tag built in $(( $(date +%s) - start ))s" >&2
  if [ "$file" = trainer.Dockerfile ]; then
    # The image's own user trains the quickstart with 4 gloo workers on this CPU.
    echo "Checking $tag: dtj local examples/quickstart.yaml inside the image" >&2
    ctr=$("${B[@]}" from --quiet "$tag")
    "${B[@]}" run --isolation chroot -v "$root/examples:/examples:ro" "$ctr" -- \
      dtj local /examples/quickstart.yaml | tail -1 >&2
    "${B[@]}" rm "$ctr" >/dev/null
  fi
  echo "$tag"
done
"${B[@]}" rmi --prune >/dev/null 2>&1 || true  # the previous builds' untagged layers
