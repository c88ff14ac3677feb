# kvstrata — build, test and demo entry points.
#   make test   install missing build packages, then fmt check, clippy -D warnings, all tests
#               (cargo test, then `make pytest`)
#   make pytest Python test playing an SGLang HiCache worker against the debug daemon
#               (tests/python/run.sh: pinned grpcio venv in ${CARGO_TARGET_DIR:-target}/pyenv)
#   make demo   build, then `kvstrata demo`: multi-turn RAG on the default model through an
#               in-process daemon (host + disk tier), TTFT with the cache vs a full recompute
#   make demo-cli  start a daemon, put/get blocks through the CLI verbs, print stats
#   make demo-cluster  two daemons sharing a 3-node Redis Cluster: prefill on A, decode on B
#               from the cluster, `kvstrata route`, a killed Redis node (docs/remote.md)
#   make bench  loopback benchmark against redis-server (see docs/benchmarks.md)

SHELL := /bin/bash
CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# System packages the build needs (RocksDB's bindgen needs libclang; the remote-tier
# tests start a Redis Cluster with redis-server and redis-cli).
APT_PACKAGES := libclang-dev clang redis-server

.PHONY: all deps build release test fmt-check clippy unit pytest demo demo-cli demo-cluster bench clean

all: build

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

build: deps
	$(CARGO) build --workspace

release: deps
	$(CARGO) build --release -p kvstrata-server

fmt-check:
	$(CARGO) fmt --all -- --check

clippy: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit: deps
	$(CARGO) test --workspace

# Needs the debug binary that `unit` (cargo test --workspace) builds.
pytest:
	bash tests/python/run.sh

test: deps fmt-check clippy unit pytest

# The engines' numeric crates are built with opt-level 3 even in debug (Cargo.toml).
demo: build
	$${CARGO_TARGET_DIR:-target}/debug/kvstrata demo

demo-cli: build
	bash scripts/demo.sh

demo-cluster: build
	bash scripts/demo-cluster.sh

bench: release
	bash benches/loopback.sh

clean:
	$(CARGO) clean
