"""`SharedPool`: a memfd registered on the daemon's mempool socket, so requests name
byte ranges of it (`PoolRange`) instead of carrying payloads.

Wire format (docs/protocol.md, "Shared-memory pools"; kvstrata's wide format): 8 bytes
little-endian magic 0x2_8DF6FBFD, a u32 little-endian name length, the name, with the
file descriptor attached (`SCM_RIGHTS`); the daemon answers a u64 little-endian pool id,
or closes the connection (its log says why). The pool stays registered while the
connection is open: `close()` (or the process's death) unregisters it.

Pool ids are unique to one run of the daemon (a random base per run): after a daemon
restart the old id names no pool, and requests naming it are refused per block
(`BAD_REGION` / `region_error`) instead of reaching another client's pool.

numpy (and torch, where installed) views of the pool are views of the mapping itself:
no copy. Do not touch a range between sending a request that names it and its answer.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import threading
from typing import Any, Optional, Sequence

import numpy as np

from .errors import PoolError
from .target import unix_socket_path
from .v1 import kvstrata_pb2 as pb

#: kvstrata's preamble magic (SGLang HiCache's 0x8DF6FBFD with 2 in its upper half):
#: the daemon answers a u64 pool id.
POOL_MAGIC = 0x2_8DF6FBFD
#: SGLang HiCache's magic: the daemon answers a u32 id of at most 31 bits.
SGLANG_POOL_MAGIC = 0x8DF6FBFD
#: Wide pool ids start here (SGLang-format ids are below it).
MIN_WIDE_POOL_ID = 1 << 31
MAX_NAME_BYTES = 240
REGISTER_TIMEOUT = 10.0
ALIGN = 64


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return data
        data += chunk
    return data


def check_name(name: str, what: str = "pool") -> bytes:
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= MAX_NAME_BYTES or "\0" in name:
        raise PoolError(f"name: a {what} name is 1 to {MAX_NAME_BYTES} bytes of UTF-8 without NUL, got {name!r}")
    return raw


def register_fd(socket_target: str, fd: int, name: str, timeout: float = REGISTER_TIMEOUT) -> tuple[int, socket.socket]:
    """Registers `fd` (a memfd or regular file, read-write) on the mempool socket and
    returns (pool id, the open registration connection)."""
    raw = check_name(name)
    path = unix_socket_path(socket_target)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        socket.send_fds(sock, [struct.pack("<QI", POOL_MAGIC, len(raw)) + raw], [fd])
        reply = _recv_exact(sock, 8)
    except OSError as e:
        sock.close()
        raise PoolError(f"registering pool {name!r} on the mempool socket {path}: {e}") from e
    if len(reply) != 8:
        sock.close()
        raise PoolError(
            f"the daemon refused pool {name!r} on {path} (closed the connection; its log says why; "
            "a daemon older than 64-bit pool ids refuses this client's preamble too)")
    (pool_id,) = struct.unpack("<Q", reply)
    if pool_id < MIN_WIDE_POOL_ID:
        sock.close()
        raise PoolError(f"pool_id: the mempool socket {path} answered {pool_id} for {name!r}, "
                        f"not a 64-bit pool id (at least {MIN_WIDE_POOL_ID})")
    return pool_id, sock


def connection_open(conn: socket.socket) -> bool:
    """Whether a registration connection is still open at the daemon's end. The daemon
    sends nothing after its answer, so a readable connection means end-of-file or error."""
    if conn.fileno() < 0:
        return False
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return True
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False


class PoolSlice:
    """A range of a pool handed out by `SharedPool.alloc` (freed by `free()`)."""

    def __init__(self, pool: "SharedPool", offset: int, length: int, extent: int) -> None:
        self.pool = pool
        self.offset = offset
        self.length = length
        self._extent = extent

    def range(self) -> pb.PoolRange:
        return pb.PoolRange(pool_id=self.pool.id, offset=self.offset, length=self.length)

    def array(self, dtype: Any = np.uint8, shape: Optional[Sequence[int]] = None) -> np.ndarray:
        return self.pool.array(dtype, shape, offset=self.offset, nbytes=self.length)

    def free(self) -> None:
        if self._extent:
            self.pool._free(self.offset, self._extent)
            self._extent = 0


class SharedPool:
    """A shared-memory pool registered with the daemon (see the module docs).

    `SharedPool.create(socket, name, size)` makes and registers a new memfd;
    `SharedPool.register(socket, fd, name)` registers memory that already lives in a
    memfd (e.g. SGLang's host KV pool with `"allocator": "shm"`)."""

    def __init__(self, pool_id: int, name: str, fd: int, size: int, conn: socket.socket, owns_fd: bool) -> None:
        self.id = pool_id
        self.name = name
        self.size = size
        self._fd = fd
        self._owns_fd = owns_fd
        self._conn = conn
        self._mmap: Optional[mmap.mmap] = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._lock = threading.Lock()
        self._free_list: list[tuple[int, int]] = [(0, size)]  # sorted (offset, length)

    @classmethod
    def create(cls, socket_target: str, name: str, size: int, *,
               timeout: float = REGISTER_TIMEOUT) -> "SharedPool":
        """A new memfd of `size` bytes, sealed against shrinking, registered as `name`
        (the registration waits at most `timeout` seconds for the daemon's answer)."""
        check_name(name)
        if size < 1:
            raise PoolError(f"size: a pool needs at least 1 byte, got {size}")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            import fcntl
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            pool_id, conn = register_fd(socket_target, fd, name, timeout)
        except BaseException:
            os.close(fd)
            raise
        return cls(pool_id, name, fd, size, conn, owns_fd=True)

    @classmethod
    def register(cls, socket_target: str, fd: int, name: str) -> "SharedPool":
        """Registers an existing memfd / file descriptor (not closed by this object)."""
        size = os.fstat(fd).st_size
        if size < 1:
            raise PoolError(f"fd: the file is empty; size it before registering {name!r}")
        pool_id, conn = register_fd(socket_target, fd, name)
        return cls(pool_id, name, fd, size, conn, owns_fd=False)

    # --- views -------------------------------------------------------------------

    @property
    def buffer(self) -> mmap.mmap:
        if self._mmap is None:
            raise PoolError(f"pool {self.name!r} is closed")
        return self._mmap

    def array(self, dtype: Any = np.uint8, shape: Optional[Sequence[int]] = None, *, offset: int = 0,
              nbytes: Optional[int] = None) -> np.ndarray:
        """A numpy view (no copy) of `nbytes` bytes at `offset` (default: to the end)."""
        nbytes = self.size - offset if nbytes is None else nbytes
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise PoolError(f"offset: [{offset}, {offset + nbytes}) is outside pool {self.name!r} of {self.size} bytes")
        dt = np.dtype(dtype)
        a = np.frombuffer(self.buffer, dtype=dt, count=nbytes // dt.itemsize, offset=offset)
        return a.reshape(shape) if shape is not None else a

    def tensor(self, dtype: Any = None, shape: Optional[Sequence[int]] = None, *, offset: int = 0,
               nbytes: Optional[int] = None) -> Any:
        """A torch CPU tensor viewing the pool (needs torch; default dtype uint8)."""
        import torch
        dtype = torch.uint8 if dtype is None else dtype
        raw = torch.frombuffer(self.buffer, dtype=torch.uint8,
                               count=(self.size - offset) if nbytes is None else nbytes, offset=offset)
        t = raw.view(dtype)
        return t.reshape(shape) if shape is not None else t

    def range(self, offset: int, length: int) -> pb.PoolRange:
        return pb.PoolRange(pool_id=self.id, offset=offset, length=length)

    # --- allocation --------------------------------------------------------------

    def alloc(self, length: int) -> PoolSlice:
        """`length` bytes at a 64-byte aligned offset (first fit)."""
        if length < 1:
            raise PoolError("length: cannot allocate 0 bytes")
        extent = (length + ALIGN - 1) // ALIGN * ALIGN
        with self._lock:
            for i, (off, n) in enumerate(self._free_list):
                if n >= extent:
                    if n == extent:
                        self._free_list.pop(i)
                    else:
                        self._free_list[i] = (off + extent, n - extent)
                    return PoolSlice(self, off, length, extent)
            free = sum(n for _, n in self._free_list)
        raise PoolError(f"pool {self.name!r} exhausted: {length} bytes asked, {free} free")

    def _free(self, offset: int, extent: int) -> None:
        with self._lock:
            fl = self._free_list
            fl.append((offset, extent))
            fl.sort()
            merged: list[tuple[int, int]] = []
            for off, n in fl:
                if merged and merged[-1][0] + merged[-1][1] == off:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    merged.append((off, n))
            self._free_list[:] = merged

    # --- life --------------------------------------------------------------------

    def is_registered(self) -> bool:
        """False once the registration connection is closed: by `close()`, or by the daemon
        (it died or restarted). A restarted daemon refuses the old pool id (ids are unique to
        a daemon run): register again to go on using the memory."""
        return self._mmap is not None and connection_open(self._conn)

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> None:
        """Unregisters the pool (closes the registration connection) and unmaps it once
        no view is left."""
        self._conn.close()
        if self._mmap is not None:
            m, self._mmap = self._mmap, None
            try:
                m.close()
            except BufferError:
                pass  # numpy/torch views still exist; the mapping goes with the last one
        if self._owns_fd and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "SharedPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SharedPool(id={self.id}, name={self.name!r}, size={self.size})"
