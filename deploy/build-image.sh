#!/usr/bin/env bash
# Builds the pygmy image FROM scratch: the release binary, the dynamic loader
# and the shared libraries it links (ldd), and an nsswitch.conf (glibc >= 2.34
# has the files and dns name services inside libc.so.6, so service names
# resolve through the engine's DNS).
#
#   deploy/build-image.sh [TAG]          # default tag: pygmy:latest
#   PYGMY_BIN=path/to/pygmy deploy/build-image.sh TAG   # use a built binary
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-pygmy:latest}"
bin="${PYGMY_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release --locked
    bin="${CARGO_TARGET_DIR:-target}/release/pygmy"
fi
ctx="$(mktemp -d "${TMPDIR:-/tmp}/pygmy-image.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/etc/pygmy" "$root/tmp" "$root/data"
cp "$bin" "$root/pygmy"
strip "$root/pygmy"
# Every library ldd names (`x => /path` and the loader's own absolute path).
for lib in $(ldd "$bin" | awk '/=> \// { print $3 } /^\t\// { print $1 }'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
printf 'root:x:0:0:root:/:/pygmy\n' > "$root/etc/passwd"
cp deploy/Dockerfile "$ctx/Dockerfile"
docker build --quiet -t "$tag" "$ctx" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes)"
