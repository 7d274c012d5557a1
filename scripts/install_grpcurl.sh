#!/usr/bin/env bash
# grpcurl from the Go module proxy, built once and cached in $GOPATH/bin.
set -euo pipefail
version=v1.9.4
bin="$(go env GOPATH)/bin/grpcurl"
if [ -x "$bin" ] && "$bin" -version 2>&1 | grep -q "${version#v}"; then
  exit 0
fi
GOFLAGS=-mod=mod go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$version"
