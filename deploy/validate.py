#!/usr/bin/env python3
"""Checks of deploy/ that need no Kubernetes schema (run by deploy/validate.sh).

  validate.py unit FILE            parse a systemd unit: known sections and keys only
                                   (the fallback when systemd-analyze is missing)
  validate.py flags BIN            every `kvstrata` flag and KVSTRATA_* variable used in
                                   deploy/ exists in BIN's --help (auth flags: allow-list)
  validate.py tomls OUTDIR         write every kvstrata TOML of deploy/ (files and ConfigMap
                                   entries) to OUTDIR, one per line on stdout: OUTDIR/NAME<TAB>ORIGIN
  validate.py selftest BIN         the flag checker rejects a misspelled flag and variable

Exit status 0 when every check passes, 1 otherwise (each problem is one line on stderr).
Needs PyYAML (installed with kubernetes-validate in the deploy venv).
"""

import json
import os
import re
import shlex
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
DOCKERFILE = os.path.join(DEPLOY, "Dockerfile")
MANIFESTS_DIR = os.path.join(DEPLOY, "kubernetes")
SYSTEMD_DIR = os.path.join(DEPLOY, "systemd")

# Flags of `kvstrata serve` that the authentication work (issue 7, part 1) is adding right
# now and that the built binary may not have yet. flag -> takes a value. Remove an entry once
# `kvstrata serve --help` lists it (this script says so when it does).
AUTH_FLAGS_PENDING = {
    "--token-file": True,
    "--insecure": False,
    "--tls-cert": True,
    "--tls-key": True,
    "--tls-client-ca": True,
}


def rel(path):
    return os.path.relpath(path, ROOT)


# ---------------------------------------------------------------- systemd unit (fallback)

# Sections and keys this project's units use or may reasonably use; anything else is
# reported, as `systemd-analyze verify` would ("Unknown key ...").
UNIT_KEYS = {
    "Unit": {
        "Description", "Documentation", "After", "Before", "Wants", "Requires", "BindsTo",
        "PartOf", "Conflicts", "Requisite", "ConditionPathExists", "AssertPathExists",
        "StartLimitIntervalSec", "StartLimitBurst", "DefaultDependencies",
    },
    "Service": {
        "Type", "User", "Group", "DynamicUser", "SupplementaryGroups", "Environment",
        "EnvironmentFile", "ExecStart", "ExecStartPre", "ExecStartPost", "ExecReload",
        "ExecStop", "ExecStopPost", "KillSignal", "KillMode", "TimeoutStartSec",
        "TimeoutStopSec", "Restart", "RestartSec", "RuntimeDirectory", "RuntimeDirectoryMode",
        "RuntimeDirectoryPreserve", "StateDirectory", "StateDirectoryMode",
        "ConfigurationDirectory", "ConfigurationDirectoryMode", "CacheDirectory",
        "LogsDirectory", "WorkingDirectory", "UMask", "LimitMEMLOCK", "LimitNOFILE",
        "LimitCORE", "MemoryMax", "MemoryHigh", "CPUQuota", "ProtectSystem", "ReadWritePaths",
        "ReadOnlyPaths", "InaccessiblePaths", "ProtectHome", "PrivateTmp", "PrivateDevices",
        "DeviceAllow", "DevicePolicy", "NoNewPrivileges", "CapabilityBoundingSet",
        "AmbientCapabilities", "ProtectKernelTunables", "ProtectKernelModules",
        "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname",
        "ProtectProc", "ProcSubset", "RestrictNamespaces", "RestrictRealtime",
        "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute", "RemoveIPC",
        "RestrictAddressFamilies", "SystemCallArchitectures", "SystemCallFilter",
        "SystemCallErrorNumber", "PrivateNetwork", "PrivateUsers", "IPAddressAllow",
        "IPAddressDeny", "StandardOutput", "StandardError", "SyslogIdentifier",
        "OOMScoreAdjust", "Nice", "IOSchedulingClass", "TasksMax",
    },
    "Install": {"WantedBy", "RequiredBy", "Alias", "Also"},
}
BOOL_KEYS = {
    "DynamicUser", "PrivateTmp", "PrivateDevices", "NoNewPrivileges", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock",
    "ProtectHostname", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
    "MemoryDenyWriteExecute", "RemoveIPC", "PrivateNetwork", "PrivateUsers",
    "DefaultDependencies",
}
BOOLS = {"yes", "no", "true", "false", "on", "off", "1", "0"}


def check_unit(path):
    problems = []
    section = None
    seen = set()
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    i = 0
    while i < len(lines):
        n, line = i + 1, lines[i].strip()
        i += 1
        while line.endswith("\\") and i < len(lines):  # continuation lines
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if m:
            section = m.group(1)
            if section not in UNIT_KEYS:
                problems.append(f"{rel(path)}:{n}: unknown section [{section}]")
            seen.add(section)
            continue
        if "=" not in line:
            problems.append(f"{rel(path)}:{n}: not KEY=VALUE: {line!r}")
            continue
        if section is None:
            problems.append(f"{rel(path)}:{n}: assignment outside a section")
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        if section in UNIT_KEYS and key not in UNIT_KEYS[section]:
            problems.append(f"{rel(path)}:{n}: unknown key '{key}' in section [{section}]")
        if key in BOOL_KEYS and value.lower() not in BOOLS:
            problems.append(f"{rel(path)}:{n}: {key} wants a boolean, got {value!r}")
        if key.startswith("Exec") and value and not value.lstrip("@-:+!").startswith("/"):
            problems.append(f"{rel(path)}:{n}: {key} needs an absolute path: {value!r}")
    for required in ("Unit", "Service"):
        if required not in seen:
            problems.append(f"{rel(path)}: missing section [{required}]")
    return problems


# ---------------------------------------------------------------- flags and variables

class Help:
    """Flags and variables one `kvstrata [SUBCOMMAND] --help` lists."""

    def __init__(self, bin_path, sub):
        argv = [bin_path] + ([sub] if sub else []) + ["--help"]
        out = subprocess.run(argv, capture_output=True, text=True, check=True,
                             env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}).stdout
        self.flags = {}  # flag -> takes a value
        for m in re.finditer(r"^\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)( <[^>]+>)?", out, re.M):
            self.flags[m.group(1)] = bool(m.group(2))
        self.env = set(re.findall(r"\[env:\s+(KVSTRATA_[A-Z0-9_]+)=", out))


class FlagChecker:
    def __init__(self, bin_path):
        self.bin = bin_path
        self.helps = {}
        self.pending_used = set()

    def help(self, sub):
        if sub not in self.helps:
            self.helps[sub] = Help(self.bin, sub)
        return self.helps[sub]

    def check_argv(self, argv, origin):
        """argv starts with the kvstrata binary. Returns problems."""
        problems = []
        top = self.help(None)
        sub = None
        known = top.flags
        i = 1
        while i < len(argv):
            tok = argv[i]
            i += 1
            if tok == "--":
                break
            if tok.startswith("--"):
                name, has_eq = tok.split("=", 1)[0], "=" in tok
                if name in AUTH_FLAGS_PENDING:
                    self.pending_used.add(name)
                if name in known:
                    takes = known[name]
                elif name in AUTH_FLAGS_PENDING:
                    takes = AUTH_FLAGS_PENDING[name]
                else:
                    where = f"kvstrata {sub} --help" if sub else "kvstrata --help"
                    problems.append(f"{origin}: flag {name} is not in `{where}`")
                    takes = False
                if takes and not has_eq:
                    i += 1  # its value
            elif tok.startswith("-") and len(tok) > 1:
                if tok not in ("-h", "-V"):
                    problems.append(f"{origin}: unexpected short option {tok}")
            elif sub is None:
                sub = tok
                try:
                    known = self.help(sub).flags
                except subprocess.CalledProcessError:
                    problems.append(f"{origin}: `kvstrata {sub}` is not a subcommand")
                    return problems
        return problems

    def check_env(self, name, origin):
        if name in self.help("serve").env or name in self.help(None).env:
            return []
        return [f"{origin}: variable {name} is not in `kvstrata serve --help`"]


def is_kvstrata(argv):
    return bool(argv) and os.path.basename(argv[0]) == "kvstrata"


def dockerfile_instructions(path):
    """(instruction, arguments, line) with continuation lines joined."""
    out, buf, start = [], "", 0
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if not buf and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if buf and line.lstrip().startswith("#"):
                continue
            if not buf:
                start = n
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            buf += line
            parts = buf.strip().split(None, 1)
            out.append((parts[0].upper(), parts[1] if len(parts) > 1 else "", start))
            buf = ""
    return out


def exec_form(text):
    text = text.strip()
    if text.startswith("["):
        return json.loads(text)
    return shlex.split(text)


def dockerfile_uses(path):
    """argv lists (ENTRYPOINT + CMD, HEALTHCHECK) and ENV names; also the image's entrypoint."""
    argvs, envs, entrypoint, cmd = [], [], None, []
    for ins, args, n in dockerfile_instructions(path):
        origin = f"{rel(path)}:{n}"
        if ins == "ENTRYPOINT":
            entrypoint = exec_form(args)
            eorigin = origin
        elif ins == "CMD":
            cmd = exec_form(args)
        elif ins == "HEALTHCHECK" and " CMD " in f" {args} ":
            argvs.append((exec_form(args.split("CMD", 1)[1]), origin))
        elif ins == "ENV":
            for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args):
                envs.append((name, origin))
    if entrypoint is not None:
        argvs.append((entrypoint + cmd, eorigin))
    return argvs, envs, entrypoint or []


def manifest_docs():
    for name in sorted(os.listdir(MANIFESTS_DIR)):
        if name.endswith((".yaml", ".yml")):
            path = os.path.join(MANIFESTS_DIR, name)
            with open(path, encoding="utf-8") as f:
                for doc in yaml.safe_load_all(f):
                    if doc:
                        yield path, doc


def pod_specs(doc):
    spec = doc.get("spec") or {}
    if doc.get("kind") == "Pod":
        yield spec
    elif isinstance(spec.get("template"), dict):
        yield (spec["template"].get("spec") or {})


def manifest_uses(entrypoint):
    argvs, envs, skipped = [], [], []
    for path, doc in manifest_docs():
        for pod in pod_specs(doc):
            for kind in ("initContainers", "containers"):
                for c in pod.get(kind) or []:
                    origin = f"{rel(path)}: {doc['kind']}/{doc['metadata']['name']} container {c['name']}"
                    if "kvstrata" not in c.get("image", ""):
                        continue
                    argv = list(c.get("command") or entrypoint) + list(c.get("args") or [])
                    if is_kvstrata(argv):
                        argvs.append((argv, origin))
                    else:
                        skipped.append(f"{origin} (runs {argv[0] if argv else '?'})")
                    for e in c.get("env") or []:
                        envs.append((e["name"], origin))
    return argvs, envs, skipped


def unit_uses():
    argvs, envs = [], []
    for name in sorted(os.listdir(SYSTEMD_DIR)):
        path = os.path.join(SYSTEMD_DIR, name)
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for n, line in enumerate(lines, 1):
            origin = f"{rel(path)}:{n}"
            if name.endswith(".service"):
                m = re.match(r"\s*(Exec\w+)=(.*)", line)
                if m:
                    argv = shlex.split(m.group(2).lstrip("@-:+!"))
                    if is_kvstrata(argv):
                        argvs.append((argv, origin))
                m = re.match(r"\s*Environment=(.*)", line)
                if m:
                    for item in shlex.split(m.group(1)):
                        envs.append((item.split("=", 1)[0], origin))
            elif name.endswith(".env"):
                # Commented examples too: they must name real variables.
                m = re.match(r"\s*#?\s*(KVSTRATA_[A-Z0-9_]+)=", line)
                if m:
                    envs.append((m.group(1), origin))
    return argvs, envs


def check_flags(bin_path):
    checker = FlagChecker(bin_path)
    problems = []
    d_argvs, d_envs, entrypoint = dockerfile_uses(DOCKERFILE)
    m_argvs, m_envs, skipped = manifest_uses(entrypoint)
    u_argvs, u_envs = unit_uses()
    argvs = d_argvs + m_argvs + u_argvs
    envs = d_envs + m_envs + u_envs
    for argv, origin in argvs:
        problems += checker.check_argv(argv, origin)
    nenv = 0
    for name, origin in envs:
        if name.startswith("KVSTRATA_"):
            nenv += 1
            problems += checker.check_env(name, origin)
    print(f"  {len(argvs)} kvstrata command lines, {nenv} KVSTRATA_* variables checked")
    for s in skipped:
        print(f"  not a kvstrata command line: {s}")
    serve = checker.help("serve").flags
    for flag in sorted(checker.pending_used):
        if flag in serve:
            print(f"  allow-listed, and now in `kvstrata serve --help` (the allow-list entry can go): {flag}")
        else:
            print(f"  allow-listed (auth work in progress, not in this binary yet): {flag}")
    if not argvs:
        problems.append("no kvstrata command line found in deploy/: the checker is broken")
    return problems


def selftest(bin_path):
    """The flag checker must reject a misspelled flag and variable and accept correct ones."""
    checker = FlagChecker(bin_path)
    bad = checker.check_argv(["kvstrata", "serve", "--host-capacityy=8GiB"], "selftest")
    bad += checker.check_env("KVSTRATA_HOST_CAPACITYY", "selftest")
    good = checker.check_argv(["kvstrata", "serve", "--host-capacity", "8GiB",
                               "--token-file", "/x", "--log-level=info"], "selftest")
    good += checker.check_env("KVSTRATA_HOST_CAPACITY", "selftest")
    problems = []
    if len(bad) != 2:
        problems.append(f"flag checker accepted a misspelled flag or variable: {bad}")
    if good:
        problems.append(f"flag checker refused correct flags: {good}")
    return problems


def extract_tomls(outdir):
    os.makedirs(outdir, exist_ok=True)
    n = 0
    for name in sorted(os.listdir(SYSTEMD_DIR)):
        if name.endswith(".toml"):
            print(f"{os.path.join(SYSTEMD_DIR, name)}\t{rel(os.path.join(SYSTEMD_DIR, name))}")
            n += 1
    for path, doc in manifest_docs():
        if doc.get("kind") != "ConfigMap":
            continue
        for key, value in (doc.get("data") or {}).items():
            if key.endswith(".toml"):
                n += 1
                out = os.path.join(outdir, f"{n}-{key}")
                with open(out, "w", encoding="utf-8") as f:
                    f.write(value)
                print(f"{out}\t{rel(path)}: ConfigMap/{doc['metadata']['name']} {key}")
    return []


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("unit", "flags", "tomls", "selftest"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, arg = sys.argv[1], sys.argv[2]
    problems = {"unit": check_unit, "flags": check_flags, "tomls": extract_tomls,
                "selftest": selftest}[cmd](arg)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
