#!/bin/sh
# Builds the Go client offline, against Debian's Go sources (golang-google-grpc-dev,
# golang-google-protobuf-dev, golang-github-golang-protobuf-1-5-dev) in GOPATH mode: no module
# proxy is needed. The stubs are generated from protos/ by Debian's protoc-gen-go and
# protoc-gen-go-grpc into OUT's GOPATH. Usage: clients/go/build.sh OUT (the program is OUT/llmos-generate).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=$(realpath -m "${1:?usage: build.sh OUT}")
GOPATH_DIR="$OUT/gopath"
rm -rf "$GOPATH_DIR"
mkdir -p "$GOPATH_DIR/src/llmos.dev"
M="Mllmos/v1/common.proto=llmos.dev/gen/llmosv1,Mllmos/v1/gateway.proto=llmos.dev/gen/llmosv1"
protoc -I"$ROOT/protos" --go_out="$M:$GOPATH_DIR/src" --go-grpc_out="$M:$GOPATH_DIR/src" \
  "$ROOT/protos/llmos/v1/common.proto" "$ROOT/protos/llmos/v1/gateway.proto"
ln -s "$HERE" "$GOPATH_DIR/src/llmos.dev/client"
cd "$GOPATH_DIR/src/llmos.dev/client"
GO111MODULE=off GOPATH="$GOPATH_DIR:/usr/share/gocode" GOFLAGS= \
  go build -trimpath -o "$OUT/llmos-generate" ./cmd/llmos-generate
