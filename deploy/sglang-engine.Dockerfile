# syntax=docker/dockerfile:1
#
# An SGLang engine image with the kvstrata Python package installed, for the sidecar
# deployment (deploy/kubernetes/sidecar.yaml, docs/deploy.md "Sidecar"). SGLang loads
# `kvstrata.sglang.KvstrataStorage` through its `dynamic` HiCache storage backend, so the
# package must be importable inside the engine's Python; nothing of SGLang is patched.
#
#   docker build -f deploy/sglang-engine.Dockerfile -t sglang-kvstrata:0.1.0 .   # repository root
#   docker build -f deploy/sglang-engine.Dockerfile \
#       --build-arg SGLANG_IMAGE=lmsysorg/sglang:<the tag you run> -t sglang-kvstrata:0.1.0 .
#
# Two stages: a slim Python image builds the wheel (the gRPC stubs are generated from proto/
# at build time, so the build needs the repository's proto/ and python/ only); the engine
# image installs it. kvstrata's tests run against the released sglang 0.5.23: pin the engine
# image of the release you run.

ARG WHEEL_IMAGE=python:3.12-slim-bookworm
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23

# ---------------------------------------------------------------------------------------------
FROM ${WHEEL_IMAGE} AS wheel

WORKDIR /src
COPY proto/ proto/
COPY python/ python/
# The build backend (setuptools, grpcio-tools) is pinned in python/pyproject.toml.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ./python

# ---------------------------------------------------------------------------------------------
FROM ${SGLANG_IMAGE}

COPY --from=wheel /wheels/ /tmp/wheels/
# The package's own dependencies (grpcio, protobuf, xxhash, numpy) carry lower bounds in
# python/pyproject.toml; pip keeps what the engine image already has when it satisfies them.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir /tmp/wheels/kvstrata-*.whl \
 && rm -rf /tmp/wheels \
 && python3 -c "import kvstrata.sglang"
