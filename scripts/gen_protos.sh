#!/usr/bin/env bash
# Generate Python stubs and the descriptor set from protos/ into OUT (default gen/).
# Usage: scripts/gen_protos.sh [OUT]   (run with the project's virtualenv python on PATH
# or PYTHON pointing at it)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/gen}
python=${PYTHON:-python}
googleapis=$("$python" -c 'import google.rpc.status_pb2 as m, pathlib; print(pathlib.Path(m.__file__).parents[2])')
cd "$repo/protos"
protos=$(find mds -name "*.proto" | sort)
mkdir -p "$out"
rm -rf "$out/mds"
"$python" -m grpc_tools.protoc -I. -I"$googleapis" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  --descriptor_set_out="$out/mds.protoset" --include_imports --include_source_info \
  $protos
# Package markers so `mds.v1` imports as a regular package.
find "$out/mds" -type d -exec touch {}/__init__.py \;
