# The two commands a newcomer needs: `make run` and `make test`.
MDS_CACHE ?= $(HOME)/.cache/mds
VENV ?= $(MDS_CACHE)/venv
export MDS_CACHE
export MDS_VENV := $(VENV)
BIN := $(VENV)/bin

.PHONY: run test lint install install-test gen settings-docs services services-stop envoy image bench soak clean

## Install (idempotent) and run the service on its embedded default (./data, SQLite).
run: install
	$(BIN)/mds serve

## Install everything the tests need (idempotent, cached) and run the test suite.
test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## ruff (lint, import order, formatting) and mypy (types); any finding fails.
lint: install-test
	$(BIN)/ruff check --quiet --output-format concise .
	$(BIN)/ruff format --check --quiet .
	$(BIN)/mypy

install:
	scripts/bootstrap.sh

install-test:
	scripts/bootstrap.sh --test

## Start real MinIO, FerretDB (MongoDB wire) and Redis on loopback (idempotent); print their settings.
services:
	@scripts/services.sh start
	@scripts/services.sh env

services-stop:
	scripts/services.sh stop

## Envoy on :8080 in front of the server on :50051: REST/JSON (/v1/...), gRPC, gRPC-Web, API docs at /docs/,
## the web console at /ui/ (built here first from web/).
envoy: install
	[ -d node_modules ] || npm ci --no-audit --no-fund --silent
	npm run --silent build-console
	$(BIN)/python scripts/run_envoy.py

## The container image mds:latest (Containerfile) with podman or docker; BASE=python:3.11-slim-bookworm builds on
## that image from a registry instead of a Debian base made here with mmdebstrap (docs/container.md).
image:
	scripts/image.sh build

## The benchmark suite (bench/): writes bench/results/results.{json,md,png} (ignored by git), each target met or
## missed at the end of results.md. The peers (KServe, MLServer) install once into $(MDS_CACHE)/peers;
## BENCH_ARGS="--only a,b --duration 10" picks workloads and lengths, "--publish" also updates bench/published/.
bench: install-test
	$(BIN)/python bench/run.py $(BENCH_ARGS)

## A bounded soak (3 minutes by default) of mixed load: writes bench/results/soak.json; SOAK_ARGS=--publish also
## updates bench/published/soak.json when it passes.
soak: install-test
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

## Regenerate gen/ from protos/: Python, Go and Node stubs, gen/mds.protoset, gen/openapi/mds.swagger.json.
gen: install
	scripts/install_go_tools.sh
	npm ci --no-audit --no-fund --silent
	PYTHON=$(BIN)/python scripts/gen_protos.sh

## Regenerate .env.example and docs/configuration.md from the settings declared in mds_grpc/config.py.
settings-docs: install
	$(BIN)/python scripts/gen_settings_docs.py

clean:
	rm -rf data logs .pytest_cache
