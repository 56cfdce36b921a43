#!/bin/sh
# Builds the graft-node image: build-image.sh [TARGET_DIR]
# graftd, ip-graft, graft-cni and libgraft-convert.so come from TARGET_DIR
# (default target/release); the launcher is built here as a static binary
# (glibc, crt-static: no musl target needed), so it runs from a hostPath in
# any pod image. The base is graft-base:bookworm, made by
# docker/demo/build-image.sh (run it first); set BASE to use another, and
# GRAFT_NODE_IMAGE to name the result (default graft-node:latest).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bins=${1:-$root/target/release}
# Only the launcher gets crt-static: with --target, build scripts and proc
# macros are built without it.
host=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p graft-launcher \
	--manifest-path "$root/Cargo.toml" --target "$host" --target-dir "$root/target/static"
launcher="$root/target/static/$host/release/graft"
file "$launcher" | grep -q 'static' || { echo "build-image: $launcher is not static" >&2; exit 1; }
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
for b in graftd ip-graft graft-cni; do cp "$bins/$b" "$ctx/"; done
cp "$launcher" "$ctx/graft"
cp "$bins/libgraft_convert.so" "$ctx/libgraft-convert.so"
cp "$root/iproute-graft/ip" "$ctx/ip"
cp "$here/image/install.sh" "$here/image/Dockerfile" "$ctx/"
docker build --build-arg "BASE=${BASE:-graft-base:bookworm}" -t "${GRAFT_NODE_IMAGE:-graft-node:latest}" "$ctx"
