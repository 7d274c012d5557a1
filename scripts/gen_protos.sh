#!/usr/bin/env bash
# Generate Python stubs, the descriptor set and the OpenAPI document from protos/ into
# OUT (default gen/). Needs protoc-gen-openapiv2 (scripts/install_go_tools.sh).
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
rm -rf "$out/mds" "$out/openapi"
"$python" -m grpc_tools.protoc -I. -I"$googleapis" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  --descriptor_set_out="$out/mds.protoset" --include_imports --include_source_info \
  $protos
# The OpenAPI (Swagger 2) document of the REST mapping (google.api.http annotations).
mkdir -p "$out/openapi"
"$python" -m grpc_tools.protoc -I. -I"$googleapis" \
  --plugin=protoc-gen-openapiv2="${MDS_CACHE:-$HOME/.cache/mds}/bin/protoc-gen-openapiv2" \
  --openapiv2_out="$out/openapi" --openapiv2_opt=allow_merge=true,merge_file_name=mds \
  $(find mds/v1 -name '*.proto' | sort)
# Package markers so `mds.v1` imports as a regular package.
find "$out/mds" -type d -exec touch {}/__init__.py \;
