#!/usr/bin/env bash
# grpcurl from the Go module proxy, built once and cached in $(go env GOPATH)/bin.
set -euo pipefail
module=github.com/fullstorydev/grpcurl
version=v1.9.4
bin="$(go env GOPATH)/bin/grpcurl"
if [ -x "$bin" ] && [[ "$(go version -m "$bin")" =~ mod[[:space:]]+$module[[:space:]]+$version ]]; then
  exit 0
fi
go install "$module/cmd/grpcurl@$version"
