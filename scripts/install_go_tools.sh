#!/usr/bin/env bash
# Go tools from the Go module proxy, built once and cached in $MDS_CACHE/bin:
# grpcurl (tests, README) and protoc-gen-openapiv2 (`make gen`: the OpenAPI document).
set -euo pipefail
bin=${MDS_CACHE:-$HOME/.cache/mds}/bin
tools=(
  "github.com/fullstorydev/grpcurl v1.9.4 cmd/grpcurl"
  "github.com/grpc-ecosystem/grpc-gateway/v2 v2.33.0 protoc-gen-openapiv2"
)
mkdir -p "$bin"
for tool in "${tools[@]}"; do
  read -r module version package <<<"$tool"
  name=$(basename "$package")
  if [ -x "$bin/$name" ] && [[ "$(go version -m "$bin/$name")" =~ mod[[:space:]]+$module[[:space:]]+$version ]]; then
    continue
  fi
  GOBIN=$bin go install "$module/$package@$version"
done
