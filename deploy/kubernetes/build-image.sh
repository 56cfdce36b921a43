#!/bin/sh
# Builds the graft-node image from release binaries: build-image.sh [TARGET_DIR]
# (default target/release). The base is graft-base:bookworm, made by
# docker/demo/build-image.sh (run it first); set BASE to use another.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bins=${1:-$root/target/release}
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
for b in graftd ip-graft graft-cni graft; do cp "$bins/$b" "$ctx/"; done
cp "$bins/libgraft_convert.so" "$ctx/libgraft-convert.so"
cp "$root/iproute-graft/ip" "$ctx/ip"
cp "$here/image/install.sh" "$here/image/Dockerfile" "$ctx/"
docker build --build-arg "BASE=${BASE:-graft-base:bookworm}" -t "${GRAFT_NODE_IMAGE:-graft-node:latest}" "$ctx"
