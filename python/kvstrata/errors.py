"""Exceptions of the kvstrata package.

Every failed call raises a `KvstrataError`. A refusal by the daemon is an `RpcError`
carrying the gRPC status code and the offending field: the daemon's messages start with
`field: reason` (docs/protocol.md, "Error model"), which `RpcError.field` and
`RpcError.reason` split.
"""

from __future__ import annotations

import re
from typing import Optional

import grpc

_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])?(?:\.[A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])?)*): ")


class KvstrataError(Exception):
    """Base class of every error this package raises."""


class TargetError(KvstrataError, ValueError):
    """A daemon address that cannot be parsed."""


class RpcError(KvstrataError):
    """The daemon (or the transport) refused a call.

    Attributes: `code` (`grpc.StatusCode`), `message` (the status message),
    `field` (the field the message names, e.g. `items[1].payload`, or None),
    `reason` (the message after the field), `method` (the RPC's name).
    """

    code: grpc.StatusCode
    message: str
    field: Optional[str]
    reason: str
    method: str

    def __init__(self, method: str, code: grpc.StatusCode, message: str) -> None:
        self.method = method
        self.code = code
        self.message = message
        m = _FIELD.match(message)
        self.field = m.group(1) if m else None
        self.reason = message[m.end():] if m else message
        super().__init__(f"{method}: {code.name}: {message}")


class NotFound(RpcError):
    """`NOT_FOUND`: an unregistered namespace, an unknown lease, a block not cached."""


class InvalidArgument(RpcError):
    """`INVALID_ARGUMENT`: a malformed request (the field says which part)."""


class FailedPrecondition(RpcError):
    """`FAILED_PRECONDITION`: e.g. pinning a block that is not cached."""


class ResourceExhausted(RpcError):
    """`RESOURCE_EXHAUSTED`: a batch over the limit, or the daemon overloaded."""


class Unavailable(RpcError):
    """`UNAVAILABLE`: the daemon cannot be reached (down, restarting, wrong address)."""


class DeadlineExceeded(RpcError):
    """`DEADLINE_EXCEEDED`: the call did not finish within its timeout."""


class Unauthenticated(RpcError):
    """`UNAUTHENTICATED`: missing, unknown or revoked bearer token."""


class PermissionDenied(RpcError):
    """`PERMISSION_DENIED`: uid not allowed, or another tenant's namespace."""


_BY_CODE = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def status_error(method: str, code: int, message: str) -> RpcError:
    """The `RpcError` subclass for a status code number (a region call's answer)."""
    status = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(status, RpcError)(method, status, message)


def rpc_error(method: str, err: grpc.RpcError) -> RpcError:
    """The `RpcError` subclass for a grpcio error."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    return _BY_CODE.get(code, RpcError)(method, code, details)


class PoolError(KvstrataError):
    """A shared-memory pool could not be created or registered."""


class RegionError(KvstrataError):
    """A KV region could not be registered, or its layout or pages are wrong.

    `status` is the daemon's refusal code (docs/protocol.md, "CUDA IPC regions"; 0 when
    the client refused it before sending), `reason` its name and `message` the daemon's
    line naming the field."""

    def __init__(self, message: str, status: int = 0, reason: str = "client") -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(message if status == 0 else f"refused ({reason}): {message}")
