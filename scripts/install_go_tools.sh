#!/usr/bin/env bash
# Go tools from the Go module proxy, built once and cached in $MDS_CACHE/bin: grpcurl
# (tests, README), the protoc plugins of `make gen` (OpenAPI, Go stubs), buf (proto lint
# and breaking-change checks), ghz (the load generator of `make bench`), and helm and kubeconform
# (the chart's offline checks).
set -euo pipefail
bin=${MDS_CACHE:-$HOME/.cache/mds}/bin
tools=(
  "github.com/fullstorydev/grpcurl v1.9.4 cmd/grpcurl"
  "github.com/grpc-ecosystem/grpc-gateway/v2 v2.33.0 protoc-gen-openapiv2"
  "google.golang.org/protobuf v1.36.12 cmd/protoc-gen-go"
  "google.golang.org/grpc/cmd/protoc-gen-go-grpc v1.6.2 ."
  "github.com/bufbuild/buf v1.75.0 cmd/buf"
  "github.com/bojand/ghz v0.93.0 cmd/ghz"
  "helm.sh/helm/v3 v3.22.0 cmd/helm"
  "github.com/yannh/kubeconform v0.8.0 cmd/kubeconform"
)
mkdir -p "$bin"
for tool in "${tools[@]}"; do
  read -r module version package <<<"$tool"
  target=$module
  [ "$package" = . ] || target=$module/$package
  name=$(basename "$target")
  if [ -x "$bin/$name" ] && [[ "$(go version -m "$bin/$name")" =~ mod[[:space:]]+$module[[:space:]]+$version ]]; then
    continue
  fi
  GOBIN=$bin go install "$target@$version"
done
