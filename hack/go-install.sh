#!/usr/bin/env bash
# Build one pinned Go binary once from its module and cache it under the user's
# cache directory, keyed by version; print its path. Used by hack/*/build.sh.
#   [GO_TAGS=a,b] hack/go-install.sh NAME VERSION PACKAGE [LDFLAGS]
set -euo pipefail
name=$1 version=$2 package=$3 ldflags=${4:-}
tags=${GO_TAGS:-}
bin="${XDG_CACHE_HOME:-$HOME/.cache}/dtj/${name}-${version}${tags:+-${tags//,/-}}/bin"
if [ -x "$bin/$name" ]; then echo "$bin/$name"; exit 0; fi
command -v go >/dev/null || { echo "error: Go is needed to build $name $version" >&2; exit 1; }
mkdir -p "$bin"
start=$(date +%s)
echo "Building $name $version (once; cached in $bin)" >&2
tmp="$(mktemp -d "$bin.partial.XXXX")"
CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false" GOBIN="$tmp" \
  go install ${tags:+-tags "$tags"} -ldflags "-s -w $ldflags" "$package@$version"
mv "$tmp/$(basename "$package")" "$bin/$name"
rmdir "$tmp"
echo "$name built in $(( $(date +%s) - start ))s" >&2
echo "$bin/$name"
