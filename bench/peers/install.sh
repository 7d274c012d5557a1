#!/usr/bin/env bash
# Idempotent install of the benchmark's peers, each in its own virtualenv outside the repo:
# $MDS_CACHE/peers/<name>. A stamp file records the pinned versions, so a second run takes seconds.
#
#   bench/peers/install.sh            install both peers (prints nothing when already installed)
#   bench/peers/install.sh mlserver   install one
set -euo pipefail
cache=${MDS_CACHE:-$HOME/.cache/mds}
python=${PYTHON:-python3.11}
onnxruntime=onnxruntime==1.31.1  # the version MDS runs (pyproject.toml)
declare -A pins=(
  # MLServer's worker processes crash with uvloop >= 0.22; the bench also runs it with parallel_workers=0.
  [mlserver]="mlserver==1.7.1 uvloop==0.21.0 $onnxruntime"
  [kserve]="kserve==0.21.0 $onnxruntime"
)

install_peer() {  # install_peer NAME
  local venv=$cache/peers/$1 stamp
  stamp="$venv/.peer-$(echo "${pins[$1]}" | sha256sum | cut -c1-16)"
  [ -f "$stamp" ] && return
  echo "installing $1 (${pins[$1]}) into $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet ${pins[$1]}
  touch "$stamp"
}

[ $# -gt 0 ] || set -- mlserver kserve
for peer in "$@"; do install_peer "$peer"; done
