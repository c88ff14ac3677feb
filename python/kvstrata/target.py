"""Where to reach the daemon: the same target forms as the `kvstrata` CLI.

`unix:///abs/path`, `unix:/abs/path` and `/abs/path` (Unix socket), `host:port` and
`http://host:port` (plain HTTP/2), `https://host:port` (TLS). Without a target: the
`KVSTRATA_ADDR` environment variable, else the daemon's default socket
(`$XDG_RUNTIME_DIR/kvstrata/kvstrata.sock`, or `/tmp/kvstrata-<euid>/kvstrata.sock`) when
one exists there, else `http://127.0.0.1:50051`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Optional

from .errors import TargetError

DEFAULT_TCP_TARGET = "http://127.0.0.1:50051"


@dataclass(frozen=True)
class Target:
    """A parsed target: `kind` is "unix", "http" or "https"; `address` the socket path or
    `host:port`."""

    kind: str
    address: str

    def grpc_target(self) -> str:
        """The target string grpcio's channel constructors take."""
        return f"unix:{self.address}" if self.kind == "unix" else self.address

    def __str__(self) -> str:
        return f"unix://{self.address}" if self.kind == "unix" else f"{self.kind}://{self.address}"


def default_uds_path() -> str:
    """The daemon's default Unix socket path."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "kvstrata", "kvstrata.sock")
    return f"/tmp/kvstrata-{os.geteuid()}/kvstrata.sock"


def default_target() -> str:
    """`KVSTRATA_ADDR` if set, else the default socket if one exists, else 127.0.0.1:50051."""
    env = os.environ.get("KVSTRATA_ADDR", "").strip()
    if env:
        return env
    path = default_uds_path()
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            return f"unix://{path}"
    except OSError:
        pass
    return DEFAULT_TCP_TARGET


def _check_host_port(s: str, original: str) -> None:
    host, sep, port = s.rpartition(":")
    if not sep:
        raise TargetError(
            f"target {original!r}: expected host:port, http://host:port or a unix socket path"
        )
    if not host:
        raise TargetError(f"target {original!r}: missing host")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise TargetError(f"target {original!r}: an IPv6 address must be bracketed ([::1]:50051)")
    if not port.isdigit() or int(port) > 65535:
        raise TargetError(f"target {original!r}: port {port!r} is not a number from 0 to 65535")


def parse_target(target: Optional[str] = None) -> Target:
    """Parses a target string (None: `default_target()`)."""
    original = default_target() if target is None else target
    t = original.strip()
    if not t:
        raise TargetError("target: empty")
    lower = t.lower()
    if lower.startswith("unix:"):
        rest = t[len("unix:"):]
        path = rest[2:] if rest.startswith("//") else rest
        if not path.startswith("/"):
            raise TargetError(
                f"target {original!r}: a unix socket path must be absolute "
                "(unix:///abs/path or unix:/abs/path)"
            )
        if not os.path.basename(path):
            raise TargetError(f"target {original!r}: the socket path names no file")
        return Target("unix", path)
    if t.startswith("/"):
        if not os.path.basename(t):
            raise TargetError(f"target {original!r}: the socket path names no file")
        return Target("unix", t)
    for scheme in ("http", "https"):
        if lower.startswith(scheme + "://"):
            rest = t[len(scheme) + 3:].rstrip("/")
            if "/" in rest:
                raise TargetError(f"target {original!r}: a gRPC target takes no path")
            _check_host_port(rest, original)
            return Target(scheme, rest)
    if "://" in t:
        scheme = t.split("://", 1)[0]
        raise TargetError(
            f"target {original!r}: unsupported scheme {scheme!r} (use http://, https://, unix:// or host:port)"
        )
    _check_host_port(t, original)
    return Target("http", t)


def unix_socket_path(target: str) -> str:
    """The path of a Unix-socket target (`unix:///path` or `/path`); refuses TCP targets."""
    parsed = parse_target(target)
    if parsed.kind != "unix":
        raise TargetError(f"{target!r} is not a Unix socket path (use unix:///path or /path)")
    return parsed.address
