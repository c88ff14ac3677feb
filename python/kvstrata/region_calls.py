"""Region calls: page puts and gets sent on a KV region's registration connection
instead of over gRPC (docs/protocol.md, "Region calls").

A page request carries page ids, not payloads, so beyond the daemon's copies its cost is
the call itself: grpcio, HTTP/2 and the daemon's hand-offs between threads. On the
region's own connection a request is a 24-byte header and the same protobuf bytes the
gRPC call would send; the daemon's thread for that region runs it and writes the answer
straight back. `Client.batch_put_pages` / `batch_get_pages` use it for a `PageBatch` of a
region when the daemon says it serves region calls (`RegisterNamespaceResponse.region_calls`)
and the request goes as one part; otherwise, and while another thread's call is on the
connection, they use gRPC as before. Same answers, same errors (`RpcError` subclasses).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Optional

import grpc

from .errors import DeadlineExceeded, Unavailable, status_error

REQUEST_MAGIC = b"KVRQ"
ANSWER_MAGIC = b"KVRA"
HEADER_BYTES = 24
#: Call numbers (the header's byte 4).
CALL_PUT = 1
CALL_GET = 2
_METHODS = {CALL_PUT: "BatchPut", CALL_GET: "BatchGet"}
#: The largest body the daemon reads (larger requests go over gRPC).
MAX_BODY_BYTES = 16 << 20
_REQUEST = struct.Struct("<4sB3xIII4x")
_ANSWER = struct.Struct("<4sBxHII8x")


class RegionCallChannel:
    """Calls on one region's registration connection, one at a time (a lock; a caller
    that finds it taken uses gRPC instead). A call that times out leaves its answer to
    come: the next call skips answers that are not its own (sequence numbers). The
    connection closing (daemon gone or restarted) raises `Unavailable` and retires the
    channel; the region is unregistered then anyway."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._seq = 0
        self._retired = False
        #: Calls answered on this connection (tests and benchmarks read it).
        self.answered = 0

    @property
    def usable(self) -> bool:
        return not self._retired and self._conn.fileno() >= 0

    def try_call(self, call: int, request: bytes, timeout: Optional[float]) -> Optional[bytes]:
        """Sends `request` (a serialized BatchPutRequest / BatchGetRequest) and returns the
        answer's body (the serialized response), or None when the channel is busy or
        retired (send it over gRPC). Raises the daemon's refusal as the `RpcError` gRPC
        would give, `DeadlineExceeded` past `timeout` seconds, `Unavailable` when the
        connection is gone."""
        if len(request) > MAX_BODY_BYTES or not self.usable:
            return None
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._call(call, request, timeout)
        finally:
            self._lock.release()

    def _retire(self, method: str, why: str) -> Unavailable:
        self._retired = True
        return Unavailable(method, grpc.StatusCode.UNAVAILABLE, f"region call: {why}")

    def _call(self, call: int, request: bytes, timeout: Optional[float]) -> bytes:
        method = _METHODS[call]
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        timeout_ms = 0 if timeout is None else max(1, min(int(timeout * 1000), 0xFFFFFFFF))
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._conn.settimeout(timeout)
            try:
                self._conn.sendall(_REQUEST.pack(REQUEST_MAGIC, call, seq, timeout_ms, len(request)) + request)
            except socket.timeout:
                raise _Torn() from None  # part of the request may have gone
            while True:
                head = self._recv(HEADER_BYTES, deadline, started=False)
                magic, answered, status, got, n = _ANSWER.unpack(head)
                if magic != ANSWER_MAGIC:
                    raise self._retire(method, f"the daemon answered {magic!r}, not a region call's answer")
                body = self._recv(n, deadline, started=True) if n else b""
                if got != seq:
                    continue  # the answer to an earlier call that timed out
                self.answered += 1
                if status != 0:
                    raise status_error(method, status, body.decode("utf-8", "replace"))
                if answered != call:
                    raise self._retire(method, f"the daemon answered call {answered} to call {call}")
                return body
        except _Torn:
            raise self._retire(method, f"the request or its answer not wholly sent or read within {timeout} s") from None
        except socket.timeout:
            raise DeadlineExceeded(method, grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"region call: no answer within {timeout} s") from None
        except ConnectionError as e:
            raise self._retire(method, f"connection lost: {e}") from None
        except OSError as e:
            if self._conn.fileno() < 0:
                raise self._retire(method, "the region is closed") from None
            raise self._retire(method, f"connection failed: {e}") from None

    def _recv(self, n: int, deadline: Optional[float], started: bool) -> bytes:
        """`n` bytes; past `deadline`, `socket.timeout` if no byte of this answer was
        read yet (`started` False and nothing read), else `_Torn` (the connection is then
        out of step: the channel retires)."""
        buf = bytearray()
        try:
            while len(buf) < n:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout()
                    self._conn.settimeout(left)
                chunk = self._conn.recv(n - len(buf))
                if not chunk:
                    raise ConnectionResetError("the daemon closed the region's connection")
                buf += chunk
        except socket.timeout:
            if started or buf:
                raise _Torn() from None
            raise
        return bytes(buf)


class _Torn(Exception):
    """An answer only partly read by the deadline."""
