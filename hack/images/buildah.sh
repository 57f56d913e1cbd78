#!/usr/bin/env bash
# buildah with the project's own image store (~/.cache/dtj/images; vfs needs no
# kernel overlay support), so builds and tests never touch the system's store.
#   hack/images/buildah.sh images
cache="${XDG_CACHE_HOME:-$HOME/.cache}/dtj/images"
exec buildah --root "$cache/storage" --runroot "$cache/run" --storage-driver vfs "$@"
