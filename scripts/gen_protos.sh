#!/usr/bin/env bash
# Generate, from protos/ into OUT (default gen/): Python stubs, the descriptor set, the
# OpenAPI document, Go stubs (gen/go, a Go module) and JS+TS-declaration stubs for Node
# (gen/ts, protobuf-es). Needs scripts/install_go_tools.sh and `npm ci` for the plugins.
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
bin=${MDS_CACHE:-$HOME/.cache/mds}/bin
rm -rf "$out/mds" "$out/openapi" "$out/go/mds" "$out/ts/mds" "$out/ts/google"
mkdir -p "$out/go" "$out/ts"
"$python" -m grpc_tools.protoc -I. -I"$googleapis" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  --descriptor_set_out="$out/mds.protoset" --include_imports --include_source_info \
  $protos
# The OpenAPI (Swagger 2) document of the REST mapping (google.api.http annotations), without
# the streamed file routes of http_files.proto (it cannot express a streamed body; docs/rest.md does).
mkdir -p "$out/openapi"
"$python" -m grpc_tools.protoc -I. -I"$googleapis" \
  --plugin=protoc-gen-openapiv2="$bin/protoc-gen-openapiv2" \
  --openapiv2_out="$out/openapi" --openapiv2_opt=allow_merge=true,merge_file_name=mds \
  $(find mds/v1 -name '*.proto' ! -name http_files.proto | sort)
# Go: gen/go is the module github.com/mds/mds/gen/go (its go.mod is kept by hand).
"$python" -m grpc_tools.protoc -I. -I"$googleapis" \
  --plugin=protoc-gen-go="$bin/protoc-gen-go" --plugin=protoc-gen-go-grpc="$bin/protoc-gen-go-grpc" \
  --go_out="$out/go" --go_opt=module=github.com/mds/mds/gen/go \
  --go-grpc_out="$out/go" --go-grpc_opt=module=github.com/mds/mds/gen/go \
  $protos
# Node: ES modules with TypeScript declarations, the Google protos they import included.
"$python" -m grpc_tools.protoc -I. -I"$googleapis" \
  --plugin=protoc-gen-es="$repo/node_modules/.bin/protoc-gen-es" \
  --es_out="$out/ts" --es_opt=target=js+dts,import_extension=js \
  $protos google/api/annotations.proto google/api/http.proto google/api/httpbody.proto google/rpc/status.proto
# Package markers so `mds.v1` imports as a regular package.
find "$out/mds" -type d -exec touch {}/__init__.py \;
