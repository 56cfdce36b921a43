#!/bin/sh
# Builds the `graft-demo` image (iperf3, nginx, curl, socat, python3, `graft`
# and libgraft-convert.so; ENTRYPOINT grafts everything onto ep-in4/ep-in6/
# ep-out4/ep-out6).
#
# usage: docker/demo/build-image.sh [--base-only] [BIN_DIR]
#
# BIN_DIR holds the built `graft` and `libgraft_convert.so` (default:
# target/release, else target/debug).
#
# The Docker engine may be unable to pull anything, so the base image
# (graft-base:bookworm) is made here when it is absent: a minimal Debian
# bookworm root filesystem built by debootstrap from the mirror the host's apt
# is configured with, then `docker import`ed. It is kept and reused by later
# runs (debootstrap takes minutes). `docker rmi graft-base:bookworm` forces a
# rebuild.
#
# Environment:
#   GRAFT_BASE_IMAGE   base image to build FROM (default graft-base:bookworm);
#                      set it to debian:bookworm on a machine that can pull
#                      (the Dockerfile then apt-get installs the tools)
#   GRAFT_DEMO_IMAGE   image to build (default graft-demo)
#   GRAFT_DEBIAN_MIRROR  Debian mirror for debootstrap (default: read from apt's sources)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
base=${GRAFT_BASE_IMAGE:-graft-base:bookworm}
image=${GRAFT_DEMO_IMAGE:-graft-demo}
suite=bookworm
packages=iperf3,nginx-light,curl,socat,python3-minimal,ca-certificates,procps

base_only=0
if [ "${1:-}" = "--base-only" ]; then
    base_only=1
    shift
fi
if [ $# -gt 1 ]; then
    echo "usage: $0 [--base-only] [BIN_DIR]" >&2
    exit 2
fi

say() { echo "build-image: $*" >&2; }
die() { echo "build-image: $*" >&2; exit 1; }

# The first apt source (one-line .list or deb822 .sources) that serves the
# suite itself (not -security/-updates), so debootstrap uses the same mirror as
# the host's apt instead of a hard-coded one.
debian_mirror() {
    if [ -n "${GRAFT_DEBIAN_MIRROR:-}" ]; then
        echo "$GRAFT_DEBIAN_MIRROR"
        return
    fi
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        m=$(awk -v s="$suite" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == s) { print $i; exit }
            }' "$f")
        [ -n "$m" ] && { echo "$m"; return; }
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        m=$(awk -v s="$suite" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " s " ") && uris != "") {
                    split(uris, u, " "); print u[1]; found = 1; exit
                }
                types = ""; suites = ""; uris = ""
            }
            /^[ \t]*$/ { flush(); next }
            /^#/ { next }
            /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
            /^URIs:/ { sub(/^URIs:[ \t]*/, ""); uris = $0 }
            /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
            END { if (!found) flush() }' "$f")
        [ -n "$m" ] && { echo "$m"; return; }
    done
    die "no apt source for Debian $suite found in /etc/apt; set GRAFT_DEBIAN_MIRROR"
}

build_base() {
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    [ "$(id -u)" = 0 ] || die "building the base image with debootstrap needs root"
    mirror=$(debian_mirror)
    work=$(mktemp -d /var/tmp/graft-base.XXXXXX)
    # A failed debootstrap may leave /proc or /sys mounted inside the tree.
    trap 'for m in proc sys dev/pts; do umount "$work/rootfs/$m" 2>/dev/null || true; done; rm -rf "$work"' EXIT
    say "making $base with debootstrap from $mirror (takes a few minutes, done once)"
    debootstrap --variant=minbase --include="$packages" "$suite" "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
        tail -n 30 "$work/debootstrap.log" >&2
        die "debootstrap failed (log above)"
    }
    # Smaller image, and no half-configured apt state baked in.
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"* \
        "$work/rootfs/var/log/"*.log "$work/rootfs/debootstrap"
    tar -C "$work/rootfs" --numeric-owner -c . |
        docker import --change 'CMD ["/bin/bash"]' \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            - "$base" >/dev/null
    say "base image $base ready"
}

if docker image inspect "$base" >/dev/null 2>&1; then
    say "reusing base image $base"
elif [ "$base" = "graft-base:$suite" ]; then
    build_base
else
    say "base image $base is not local; docker build will pull it"
fi
[ "$base_only" = 1 ] && exit 0

if [ $# -eq 1 ]; then
    bindir=$1
elif [ -x "$root/target/release/graft" ] && [ -f "$root/target/release/libgraft_convert.so" ]; then
    bindir=$root/target/release
else
    bindir=$root/target/debug
fi
[ -x "$bindir/graft" ] || die "$bindir/graft is missing: build first (cargo build --workspace [--release])"
[ -f "$bindir/libgraft_convert.so" ] || die "$bindir/libgraft_convert.so is missing: build first (cargo build --workspace [--release])"

ctx=$(mktemp -d /var/tmp/graft-demo-ctx.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
cp "$here/Dockerfile" "$ctx/"
cp "$bindir/graft" "$ctx/graft"
cp "$bindir/libgraft_convert.so" "$ctx/libgraft-convert.so"
say "building $image FROM $base with binaries from $bindir"
docker build -q --build-arg "BASE=$base" -t "$image" "$ctx" >/dev/null
say "image $image ready"
