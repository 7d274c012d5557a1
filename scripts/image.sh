#!/usr/bin/env bash
# The container image (Containerfile) with podman, or docker when podman is missing. Idempotent; the Debian
# base made without a registry is cached in $MDS_CACHE/image, layers in the engine's own store.
#
#   scripts/image.sh install   install podman, runc, slirp4netns and mmdebstrap from apt (skipped when present)
#   scripts/image.sh build     build $IMAGE (default mds:latest) on $BASE; print its size and the build time
#   scripts/image.sh env       print the settings podman needs here (CONTAINERS_CONF) and the image's name
#
# BASE: the runtime base. Unset, with mmdebstrap installed, a Debian bookworm with python3 is made from Debian's
# packages and imported as localhost/mds-base (no registry needed); without mmdebstrap, the Containerfile's
# default python:3.11-slim-bookworm is pulled.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${MDS_CACHE:-$HOME/.cache/mds}/image
image=${IMAGE:-mds:latest}
engine=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
# This machine's limits: ulimits below its hard limits, runc with cgroupfs (crun fails on hybrid cgroups).
export CONTAINERS_CONF=$cache/containers.conf
# The base's recipe; its hash names the cached tarball and the imported image, so a new recipe makes a new base.
base_recipe=(--variant=essential --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --aptopt='APT::Install-Recommends "false"' --include=python3,python3-venv,libstdc++6,ca-certificates,passwd
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*' bookworm)
base_id=$(printf '%s\n' "${base_recipe[@]}" | sha256sum | cut -c1-12)

install() {
  command -v podman >/dev/null && command -v runc >/dev/null && command -v slirp4netns >/dev/null \
    && command -v mmdebstrap >/dev/null && return
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc slirp4netns mmdebstrap \
    >/dev/null
}

write_containers_conf() {
  mkdir -p "$cache"
  cat >"$CONTAINERS_CONF.tmp" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
  mv "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"
}

local_base() {  # the Debian base from Debian's packages, imported once; prints its name
  local name=localhost/mds-base:bookworm-$base_id tarball=$cache/debian-bookworm-python3-$base_id.tar
  if ! "$engine" image inspect "$name" >/dev/null 2>&1; then
    if [ ! -f "$tarball" ]; then
      echo "making the Debian base with mmdebstrap (first time only; about a minute)" >&2
      rm -f "$cache"/debian-bookworm-python3-*.tar  # bases of earlier recipes
      mmdebstrap --quiet "${base_recipe[@]}" "$tarball.tmp.tar" >&2
      mv "$tarball.tmp.tar" "$tarball"
    fi
    "$engine" import "$tarball" "$name" >/dev/null
  fi
  echo "$name"
}

build() {
  local base=${BASE:-} start=$SECONDS previous size
  if [ -z "$base" ] && command -v mmdebstrap >/dev/null; then
    base=$(local_base)
  fi
  local args=(build --network host --file "$repo/Containerfile" --tag "$image")
  [ -n "$base" ] && args+=(--build-arg "BASE=$base")
  [ -n "${PIP_CERT:-}" ] && args+=(--secret "id=pip-ca,src=$PIP_CERT")  # a proxy's CA, for pip in the build
  previous=$("$engine" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
  "$engine" "${args[@]}" "$repo" >&2
  if [ -n "$previous" ] && [ "$previous" != "$("$engine" image inspect --format '{{.Id}}' "$image")" ]; then
    "$engine" rmi "$previous" >/dev/null 2>&1 || true  # the replaced image, unless a container still uses it
  fi
  size=$("$engine" image inspect --format '{{.Size}}' "$image")
  echo "built $image on ${base:-the default base} with $engine: $((size / 1000000)) MB, $((SECONDS - start)) s"
}

case "${1:-build}" in
  install) install; write_containers_conf ;;
  build) write_containers_conf; build ;;
  env) echo "CONTAINERS_CONF=$CONTAINERS_CONF"; echo "IMAGE=$image" ;;
  *) echo "usage: $0 install|build|env" >&2; exit 2 ;;
esac
