#!/usr/bin/env bash
# Idempotent setup: a virtualenv outside the repo with the pinned Python
# packages, this checkout installed into it (editable), and with `--test`
# the linters and the test tools (grpcurl, protoc-gen-openapiv2, Chromium; MinIO, FerretDB and Redis; podman) and
# the real ONNX models the tests use.
# Everything built or downloaded is cached under $MDS_CACHE, so a second run
# takes seconds.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${MDS_CACHE:-$HOME/.cache/mds}
venv=${MDS_VENV:-$cache/venv}
python=${PYTHON:-python3}
extras=dev,rest
[ "${1:-}" = "--test" ] && extras=test,lint
[ "${MDS_GPU:-0}" = 1 ] && extras=$extras,gpu  # onnxruntime-gpu in place of onnxruntime (docs/gpu.md)

mkdir -p "$cache"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"

# Dependencies: reinstalled only when pyproject.toml or the extras change.
stamp="$venv/.mds-deps-$(sha256sum "$repo/pyproject.toml" | cut -c1-16)-$extras"
if [ ! -f "$stamp" ]; then
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet -e "$repo[$extras]"
  # onnxruntime and onnxruntime-gpu write the same files: keep one, and reinstall it whole.
  if [[ $extras == *gpu ]]; then drop=onnxruntime keep=onnxruntime-gpu; else drop=onnxruntime-gpu keep=onnxruntime; fi
  if "$venv/bin/pip" show --quiet "$drop" 2>/dev/null; then
    "$venv/bin/pip" uninstall --quiet --yes "$drop"
    pin=$(grep -o "\"$keep[^\"]*==[0-9.]*" "$repo/pyproject.toml" | head -1 | sed 's/^"//; s/\[.*\]//')
    "$venv/bin/pip" install --quiet --force-reinstall --no-deps "$pin"
  fi
  rm -f "$venv"/.mds-deps-*-"$extras"
  for other in "$venv"/.mds-deps-*; do  # the other build's stamps no longer hold
    [[ $other == *,gpu ]] && other_gpu=1 || other_gpu=0
    [ "$other_gpu" = "${MDS_GPU:-0}" ] || rm -f "$other"
  done
  touch "$stamp"
fi
# The package itself: re-pointed at this checkout when another one installed it. The check
# runs from / so that a checkout in the working folder cannot answer for the installed one.
if ! (cd / && "$venv/bin/python" -c "import mds_grpc.cli as m, sys; sys.exit(not m.__file__.startswith('$repo/'))") 2>/dev/null; then
  "$venv/bin/pip" install --quiet --no-deps -e "$repo"
fi

if [ "${1:-}" = "--test" ]; then
  "$repo/scripts/install_go_tools.sh"
  (cd "$repo" && npm ci --no-audit --no-fund --silent)  # protoc-gen-es and the Node client test; ~/.npm caches it
  (cd "$repo" && npm run --silent build-console)  # web/dist: the console Envoy serves at /ui/ (tests/test_console.py)
  if ! command -v chromium >/dev/null; then  # the browser test of the API docs page
    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null
  fi
  "$repo/scripts/services.sh" install
  "$repo/scripts/image.sh" install  # podman, runc, slirp4netns, mmdebstrap: the image test
  "$venv/bin/python" "$repo/scripts/fetch_test_models.py" >/dev/null
fi
