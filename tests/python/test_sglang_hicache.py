#!/usr/bin/env python3
"""kvstrata as SGLang HiCache L3 storage, tested by playing an SGLang worker.

Starts the debug daemon (KVSTRATA_BIN) with a mempool socket and an SGLang socket, then
does what an SGLang worker with `--hicache-storage-backend rpc` does, over real sockets:
registers memfd pools with SCM_RIGHTS, and moves pages through the
`sglang.runtime.hicache.StorageServer` gRPC service by naming byte ranges of those pools.
Run through tests/python/run.sh (it builds the venv and the stubs); see docs/sglang.md.

Environment: KVSTRATA_BIN (required), KVSTRATA_TEST_TMP (where the daemon's temp dir goes),
KVSTRATA_TEST_SEED (random seed; printed at start, so a failure can be replayed).
"""

import itertools
import json
import mmap
import os
import random
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zlib

import grpc

from kvstrata.v1 import kvstrata_pb2, kvstrata_pb2_grpc
from sglang.runtime import hicache_pb2, hicache_pb2_grpc

MAGIC = 0x8DF6FBFD
MAX_SGLANG_POOL_ID = (1 << 31) - 1  # SGLang's Transfer.pool_id is an int32
MIB = 1 << 20
POOL_BYTES = 64 * MIB
POOL_NAME = "sglang-test-pool"
PAGE = 256 * 1024  # total bytes of one transfer (one SGLang page, K and V)
GUARD = 32  # poisoned bytes checked on each side of every destination iovec
POISON = 0xAA
MSG_LIMIT = 512 * MIB  # what SGLang's rpc backend sets on its channel
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MSG_LIMIT),
    ("grpc.max_receive_message_length", MSG_LIMIT),
]
RPC_TIMEOUT = 15
SEED = int(os.environ.get("KVSTRATA_TEST_SEED", str(time.time_ns() % (1 << 32))))

# Per-transfer result codes (docs/sglang.md).
OK, NOT_FOUND, NO_SPACE, BAD_POOL, BAD_IOVEC, BAD_ID, INTERNAL = range(7)


def recv_until_eof(sock, timeout):
    """Reads until the peer closes; returns what came. Fails if it stays open."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data
    except socket.timeout:
        raise AssertionError(
            f"the daemon kept the registration connection open for {timeout} s "
            f"(received {data!r})"
        ) from None


def wait_until(what, fn, timeout=5.0, interval=0.02):
    """Polls fn() until it returns a truthy value; fails with `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)


def iovecs(spans):
    return [hicache_pb2.Iovec(offset=o, length=n) for o, n in spans]


def transfer(tid, spans, pool_id):
    return hicache_pb2.Transfer(id=tid, iovec=iovecs(spans), pool_id=pool_id)


def split(total, rng):
    """Splits a page into 2 (K half, V half) or 3 uneven pieces."""
    if rng.random() < 0.5:
        return [total // 2, total - total // 2]
    a = rng.randrange(1, total // 2)
    b = rng.randrange(1, total - a - 1)
    return [a, b, total - a - b]


class Pool:
    """A memfd pool registered on the mempool socket, as an SGLang worker does it.

    The registration connection stays open while the pool lives; closing it unregisters.
    """

    serial = itertools.count()

    def __init__(self, mempool_path, name=POOL_NAME, size=POOL_BYTES, seed=0):
        self.name = name
        self.size = size
        # The trailing "." keeps one name from being a prefix of another in /proc.
        self.memfd_name = f"kvs-pytest-{os.getpid()}-{next(Pool.serial)}."
        self.fd = os.memfd_create(self.memfd_name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mem = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.rng = random.Random(seed)
        self.next_free = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(mempool_path)
        raw = name.encode()
        socket.send_fds(self.sock, [struct.pack("<QI", MAGIC, len(raw)) + raw], [self.fd])
        reply = b""
        while len(reply) < 4:
            chunk = self.sock.recv(4 - len(reply))
            if not chunk:
                raise AssertionError(
                    f"mempool socket closed the registration of {name!r} after {reply!r}"
                )
            reply += chunk
        (self.id,) = struct.unpack("<I", reply)

    def unregister(self):
        self.sock.close()

    def release(self):
        self.sock.close()
        if not self.mem.closed:
            self.mem.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- byte ranges -------------------------------------------------------------

    def reset(self):
        self.next_free = 0

    def alloc(self, n):
        """Next free range of n bytes after a random gap (so ranges are scattered and
        never adjacent: the gap holds the guard bytes)."""
        off = self.next_free + self.rng.randrange(2 * GUARD, 4096)
        if off + n + 2 * GUARD > self.size:
            raise RuntimeError("test pool exhausted; call reset()")
        self.next_free = off + n
        return off

    def spans(self, total):
        return [(self.alloc(n), n) for n in split(total, self.rng)]

    def write(self, spans, data):
        pos = 0
        for off, n in spans:
            self.mem[off : off + n] = data[pos : pos + n]
            pos += n
        assert pos == len(data)

    def read(self, spans):
        return b"".join(bytes(self.mem[off : off + n]) for off, n in spans)

    def poison(self, spans):
        for off, n in spans:
            lo, hi = max(0, off - GUARD), min(self.size, off + n + GUARD)
            self.mem[lo:hi] = bytes([POISON]) * (hi - lo)

    def check_guards(self, spans):
        """Names the first guard range that lost its poison, or returns None."""
        for off, n in spans:
            for lo, hi in ((max(0, off - GUARD), off), (off + n, min(self.size, off + n + GUARD))):
                if bytes(self.mem[lo:hi]) != bytes([POISON]) * (hi - lo):
                    return f"guard bytes [{lo}, {hi}) of pool {self.id} were overwritten"
        return None


def first_difference(a, b):
    if len(a) != len(b):
        return f"length {len(a)} != {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at byte {i}: {x:#04x} != {y:#04x}"
    return None


def make_workdir(prefix):
    base = os.environ.get("KVSTRATA_TEST_TMP") or None
    if base:
        os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=prefix, dir=base)
    if len(workdir) > 80:  # Unix socket paths are limited to 107 bytes
        shutil.rmtree(workdir)
        workdir = tempfile.mkdtemp(prefix="kvs-" + prefix)
    WORKDIRS.append(workdir)
    return workdir


WORKDIRS = []  # removed at the end when every test passed, kept otherwise


class Daemon:
    """One `kvstrata serve` with a mempool and an SGLang socket in `workdir`."""

    def __init__(self, workdir, extra=()):
        binary = os.environ.get("KVSTRATA_BIN", "")
        if not binary or not os.access(binary, os.X_OK):
            raise RuntimeError(f"KVSTRATA_BIN={binary!r} is not an executable daemon binary")
        self.workdir = workdir
        self.mempool_path = os.path.join(workdir, "mempool.sock")
        self.sglang_path = os.path.join(workdir, "sglang.sock")
        self.ready_path = os.path.join(workdir, "ready.json")
        self.log_path = os.path.join(workdir, "daemon.log")
        if os.path.exists(self.ready_path):
            os.unlink(self.ready_path)
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("KVSTRATA_") and k != "RUST_LOG"
        }
        env["NO_COLOR"] = "1"
        cmd = [
            binary, "serve",
            "--tcp-addr", "127.0.0.1:0",
            "--uds-path", os.path.join(workdir, "kv.sock"),
            "--metrics-addr", "",
            "--host-capacity", "256MiB",
            "--mempool-socket", self.mempool_path,
            "--sglang-socket", self.sglang_path,
            "--ready-file", self.ready_path,
            "--log-level", "info",
            *extra,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.channels = []
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.proc.returncode} before it was ready:\n" + self.log()
                )
            try:
                with open(self.ready_path) as f:
                    self.ready = json.load(f)
                break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("daemon wrote no ready file within 60 s:\n" + self.log())
            time.sleep(0.05)
        # Exactly what an SGLang worker opens: a plain grpcio channel to `unix:PATH`.
        ch = grpc.insecure_channel("unix:" + self.ready["sglang"], options=GRPC_OPTIONS)
        self.hicache = hicache_pb2_grpc.StorageServerStub(ch)
        kv = grpc.insecure_channel(self.ready["tcp"], options=GRPC_OPTIONS)
        self.kv = kvstrata_pb2_grpc.KvCacheStub(kv)
        self.channels = [ch, kv]

    def log(self, tail=6000):
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError as e:
            return f"(no daemon log: {e})"
        return f"--- daemon log {self.log_path} (tail) ---\n{text[-tail:]}\n--- end of daemon log ---"

    def terminate(self, timeout=10):
        """SIGTERM; returns the exit status, or None if it did not exit in time."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        for ch in self.channels:
            ch.close()
        self.channels = []
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


FAILED_LOGS = []  # daemon logs to show when a test failed


class SglangHicacheTest(unittest.TestCase):
    """One daemon (host tier only) for the whole class, used by the tests in order."""

    daemon = None

    @classmethod
    def setUpClass(cls):
        cls.daemon = Daemon(make_workdir("sglang-"))
        FAILED_LOGS.append(cls.daemon)
        cls.workdir = cls.daemon.workdir
        cls.mempool_path = cls.daemon.mempool_path
        cls.sglang_path = cls.daemon.sglang_path
        cls.ready = cls.daemon.ready
        cls.proc = cls.daemon.proc
        cls.hicache = cls.daemon.hicache
        cls.kv = cls.daemon.kv
        cls.seen_pool_ids = set()

    @classmethod
    def tearDownClass(cls):
        if cls.daemon is not None:
            cls.daemon.kill()

    # --- helpers -----------------------------------------------------------------

    def pool(self, name=POOL_NAME, size=POOL_BYTES):
        p = Pool(self.mempool_path, name=name, size=size, seed=SEED ^ next(Pool.serial))
        self.addCleanup(p.release)
        self.assertTrue(1 <= p.id <= MAX_SGLANG_POOL_ID, f"{p.id} does not fit SGLang's int32")
        self.assertNotIn(p.id, type(self).seen_pool_ids, f"pool id {p.id} reused for {name!r}")
        type(self).seen_pool_ids.add(p.id)
        return p

    def stats(self):
        return self.kv.Stats(kvstrata_pb2.StatsRequest(), timeout=RPC_TIMEOUT)

    def put(self, transfers):
        resp = self.hicache.BatchPut(hicache_pb2.BatchPutRequest(puts=transfers), timeout=RPC_TIMEOUT)
        return list(resp.results)

    def get(self, transfers):
        resp = self.hicache.BatchGet(hicache_pb2.BatchGetRequest(gets=transfers), timeout=RPC_TIMEOUT)
        return list(resp.results)

    def exist(self, ids):
        resp = self.hicache.Exist(hicache_pb2.ExistRequest(id=ids), timeout=RPC_TIMEOUT)
        return list(resp.results)

    def daemon_holds(self):
        """What the daemon's open fds and mappings point at (one string)."""
        pid = self.proc.pid
        parts = []
        try:
            with open(f"/proc/{pid}/maps") as f:
                parts.append(f.read())
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    parts.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    pass
        except OSError as e:
            self.fail(f"cannot read /proc/{pid}: {e}")
        return "\n".join(parts)

    def assert_daemon_lets_go(self, markers, what):
        """Polls until nothing in the daemon's fds or mappings names any marker."""

        def released():
            held = self.daemon_holds()
            return not any(m in held for m in markers)

        wait_until(f"the daemon released {what} ({', '.join(markers)})", released, timeout=5)

    def put_pages(self, pool, ids, total=PAGE, rng=None):
        """Writes random pages into scattered ranges of `pool` and BatchPuts them.
        Returns {id: payload}."""
        rng = rng or random.Random(SEED ^ zlib.crc32(ids[0]))
        payloads, transfers = {}, []
        for tid in ids:
            data = rng.randbytes(total)
            spans = pool.spans(total)
            pool.write(spans, data)
            payloads[tid] = data
            transfers.append(transfer(tid, spans, pool.id))
        self.assertEqual(self.put(transfers), [OK] * len(ids), "BatchPut results")
        return payloads

    def get_and_check(self, pool, payloads, missing=(), total=PAGE):
        """BatchGets every id of `payloads` (and the `missing` ids, which must come back
        NOT_FOUND) into freshly poisoned ranges of `pool`, and compares every byte."""
        order = list(payloads) + list(missing)
        random.Random(SEED).shuffle(order)
        dests = {tid: pool.spans(total) for tid in order}
        for spans in dests.values():
            pool.poison(spans)
        results = self.get([transfer(tid, dests[tid], pool.id) for tid in order])
        expected = [NOT_FOUND if tid in missing else OK for tid in order]
        self.assertEqual(results, expected, "BatchGet results")
        for tid in order:
            got = pool.read(dests[tid])
            if tid in missing:
                self.assertEqual(got, bytes([POISON]) * total, f"a miss wrote into its iovecs ({tid[:40]!r})")
            else:
                self.assertIsNone(first_difference(got, payloads[tid]), f"payload of {tid[:40]!r}")
            self.assertIsNone(pool.check_guards(dests[tid]))

    def close_and_wait(self, pools):
        """Closes the registrations and waits until the daemon dropped them."""
        before = self.stats()
        for p in pools:
            p.unregister()
        want = before.pools - len(pools)
        wait_until(
            f"Stats.pools drops from {before.pools} to {want}",
            lambda: self.stats().pools == want,
        )
        self.assertEqual(self.stats().pool_bytes, before.pool_bytes - sum(p.size for p in pools))
        self.assert_daemon_lets_go([p.memfd_name for p in pools], "closed pools")

    # --- tests, in order ---------------------------------------------------------

    def test_01_ready_file_and_sockets(self):
        self.assertEqual(self.ready.get("mempool"), self.mempool_path)
        self.assertEqual(self.ready.get("sglang"), self.sglang_path)
        self.assertIsNone(self.ready.get("metrics"))
        self.assertRegex(self.ready.get("tcp") or "", r"^127\.0\.0\.1:[1-9][0-9]*$")
        for path in (self.mempool_path, self.sglang_path):
            st = os.stat(path)
            self.assertTrue(stat.S_ISSOCK(st.st_mode), f"{path} is not a socket")
            self.assertEqual(stat.S_IMODE(st.st_mode), 0o600, f"mode of {path}")
        s = self.stats()
        self.assertEqual((s.pools, s.pool_bytes), (0, 0), "no pool registered yet")

    def test_01b_plain_grpcio_channel(self):
        # SGLang opens a plain grpcio channel to `unix:PATH`. grpc-core (since 1.57) then
        # sends the socket path, %-encoded, as the HTTP/2 :authority; the daemon must
        # accept that rather than reset the stream.
        try:
            self.assertEqual(self.exist([b"probe"]), [False])
        except grpc.RpcError as e:
            self.fail(
                f"Exist over a plain grpcio unix: channel failed: {e.code()} {e.details()} "
                "(an HTTP/2 server that rejects grpc-core's %-encoded :authority answers "
                "RST_STREAM PROTOCOL_ERROR to every SGLang call)"
            )

    def test_02_register_pools(self):
        a = self.pool()
        b = self.pool()
        self.assertNotEqual(b.id, a.id)
        s = self.stats()
        self.assertEqual(s.pools, 2)
        self.assertEqual(s.pool_bytes, 2 * POOL_BYTES)
        held = self.daemon_holds()
        for p in (a, b):
            self.assertIn(p.memfd_name, held, f"the daemon did not map pool {p.id}'s memfd")
        self.close_and_wait([a, b])
        self.assertEqual(self.stats().pools, 0)

    def test_03_put_exist_get(self):
        pool = self.pool()
        rng = random.Random(SEED ^ 3)
        ids = [f"{rng.getrandbits(128):032x}_0_k".encode() for _ in range(6)]
        long_id = (f"{rng.getrandbits(256):064x}" * 2).encode()[:100]  # > 64 bytes
        longest_id = bytes(rng.choice(b"0123456789abcdef") for _ in range(4096))
        ids += [long_id, longest_id]
        payloads = self.put_pages(pool, ids, rng=rng)

        # Unknown ids, among them near misses of the long ids.
        unknown = [
            b"never-stored",
            long_id[:-1] + bytes([long_id[-1] ^ 1]),
            long_id[:64],
            long_id + b"x",
            longest_id[:-1] + bytes([longest_id[-1] ^ 1]),
        ]
        order = ids + unknown
        random.Random(SEED ^ 31).shuffle(order)
        self.assertEqual(
            self.exist(order), [tid in payloads for tid in order], "Exist for stored and unknown ids"
        )

        # Read everything back into other, poisoned ranges, with a miss in the batch.
        self.get_and_check(pool, payloads, missing=[b"never-stored", long_id[:64]])

        # A second put under the same id replaces the bytes.
        payloads2 = self.put_pages(pool, [ids[0]], rng=rng)
        self.assertNotEqual(payloads2[ids[0]], payloads[ids[0]])
        self.get_and_check(pool, payloads2)

        # Pages live per (pool name, total length): another length is another namespace.
        half = pool.spans(PAGE // 2)
        pool.poison(half)
        self.assertEqual(self.get([transfer(ids[1], half, pool.id)]), [NOT_FOUND])
        self.assertEqual(pool.read(half), bytes([POISON]) * (PAGE // 2))

        # Another pool of the same name reads them; a pool of another name does not.
        same = self.pool()
        self.get_and_check(same, {ids[1]: payloads[ids[1]], long_id: payloads[long_id]})
        other = self.pool(name="sglang-other-pool")
        self.get_and_check(other, {}, missing=[ids[1], long_id])
        self.close_and_wait([pool, same, other])

    def test_04_bad_transfers(self):
        pool = self.pool()
        rng = random.Random(SEED ^ 4)
        good = [f"good-{rng.getrandbits(64):016x}-{i}".encode() for i in range(2)]
        payloads = {}
        for tid in good:
            payloads[tid] = rng.randbytes(PAGE)
        spans = {tid: pool.spans(PAGE) for tid in good}
        for tid in good:
            pool.write(spans[tid], payloads[tid])
        end = POOL_BYTES
        bad = [
            # (id, spans, pool id, expected result)
            (b"bad-partly-outside", [(0, PAGE // 2), (end - 1000, PAGE // 2)], pool.id, BAD_IOVEC),
            (b"bad-wholly-outside", [(end, PAGE)], pool.id, BAD_IOVEC),
            (b"bad-offset-overflow", [((1 << 64) - 8, PAGE)], pool.id, BAD_IOVEC),
            (b"bad-no-iovec", [], pool.id, BAD_IOVEC),
            (b"bad-zero-length", [(0, 0)], pool.id, BAD_IOVEC),
            (b"", [(0, PAGE)], pool.id, BAD_ID),
            (b"i" * 4097, [(0, PAGE)], pool.id, BAD_ID),
            (b"bad-unknown-pool", [(0, PAGE)], 999_999, BAD_POOL),
            (b"bad-pool-zero", [(0, PAGE)], 0, BAD_POOL),
            (b"bad-pool-negative", [(0, PAGE)], -1, BAD_POOL),
        ]
        transfers = [transfer(good[0], spans[good[0]], pool.id)]
        transfers += [transfer(tid, sp, pid) for tid, sp, pid, _ in bad]
        transfers += [transfer(good[1], spans[good[1]], pool.id)]
        self.assertEqual(self.put(transfers), [OK] + [code for *_, code in bad] + [OK])
        refused = [tid for tid, *_ in bad if tid and len(tid) <= 4096]
        self.assertEqual(
            self.exist(good + refused),
            [True] * len(good) + [False] * len(refused),
            "a refused transfer must store nothing",
        )

        # The same kinds of faults in a BatchGet, around good gets that must still land.
        dests = {tid: pool.spans(PAGE) for tid in good}
        for sp in dests.values():
            pool.poison(sp)
        # A refused get must write nothing, not even the part of it inside the pool.
        head = [(pool.alloc(PAGE - 2000), PAGE - 2000)]
        tail = [(end - 1000, 1000)]
        pool.poison(head)
        pool.mem[end - 1000 : end] = bytes([POISON]) * 1000
        gets = [
            (good[0], dests[good[0]], pool.id, OK),
            (good[1], head + [(end - 1000, 2000)], pool.id, BAD_IOVEC),
            (good[1], [(end + 4096, PAGE)], pool.id, BAD_IOVEC),
            (good[0], [], pool.id, BAD_IOVEC),
            (good[0], dests[good[0]], 999_999, BAD_POOL),
            (b"", [(0, PAGE)], pool.id, BAD_ID),
            (b"i" * 4097, [(0, PAGE)], pool.id, BAD_ID),
            (good[1], dests[good[1]], pool.id, OK),
        ]
        results = self.get([transfer(tid, sp, pid) for tid, sp, pid, _ in gets])
        self.assertEqual(results, [code for *_, code in gets], "BatchGet results")
        for tid in good:
            self.assertIsNone(first_difference(pool.read(dests[tid]), payloads[tid]), tid)
            self.assertIsNone(pool.check_guards(dests[tid]))
        self.assertEqual(
            pool.read(tail), bytes([POISON]) * 1000, "a refused get wrote into the pool's last bytes"
        )
        self.assertEqual(
            pool.read(head), bytes([POISON]) * (PAGE - 2000), "a refused get wrote its first iovec"
        )
        self.close_and_wait([pool])

    def test_05_concurrent_pools(self):
        pools = [self.pool(), self.pool()]
        errors = []
        rounds, per_round = 8, 4

        def worker(w, pool):
            rng = random.Random(SEED ^ (50 + w))
            ch = grpc.insecure_channel("unix:" + self.sglang_path, options=GRPC_OPTIONS)
            stub = hicache_pb2_grpc.StorageServerStub(ch)
            try:
                for r in range(rounds):
                    pool.reset()
                    ids = [f"w{w}-r{r}-{i}-{rng.getrandbits(64):016x}".encode() for i in range(per_round)]
                    payloads, puts, gets, dests = {}, [], [], {}
                    for tid in ids:
                        payloads[tid] = rng.randbytes(PAGE)
                        sp = pool.spans(PAGE)
                        pool.write(sp, payloads[tid])
                        puts.append(transfer(tid, sp, pool.id))
                    res = list(stub.BatchPut(hicache_pb2.BatchPutRequest(puts=puts), timeout=RPC_TIMEOUT).results)
                    if res != [OK] * per_round:
                        errors.append(f"worker {w} round {r}: BatchPut {res}")
                        return
                    ex = list(stub.Exist(hicache_pb2.ExistRequest(id=ids + [b"w-none"]), timeout=RPC_TIMEOUT).results)
                    if ex != [True] * per_round + [False]:
                        errors.append(f"worker {w} round {r}: Exist {ex}")
                        return
                    for tid in ids:
                        dests[tid] = pool.spans(PAGE)
                        pool.poison(dests[tid])
                        gets.append(transfer(tid, dests[tid], pool.id))
                    res = list(stub.BatchGet(hicache_pb2.BatchGetRequest(gets=gets), timeout=RPC_TIMEOUT).results)
                    if res != [OK] * per_round:
                        errors.append(f"worker {w} round {r}: BatchGet {res}")
                        return
                    for tid in ids:
                        diff = first_difference(pool.read(dests[tid]), payloads[tid]) or pool.check_guards(dests[tid])
                        if diff:
                            errors.append(f"worker {w} round {r} {tid!r}: {diff}")
                            return
            except Exception as e:  # noqa: BLE001 - reported as a test failure below
                errors.append(f"worker {w}: {type(e).__name__}: {e}")
            finally:
                ch.close()

        threads = [threading.Thread(target=worker, args=(w, p), daemon=True) for w, p in enumerate(pools)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=40)
            self.assertFalse(t.is_alive(), "a worker thread did not finish within 40 s")
        self.assertEqual(errors, [])
        self.close_and_wait(pools)

    def test_06_pool_close(self):
        a, b = self.pool(), self.pool()
        rng = random.Random(SEED ^ 6)
        ids = [f"close-{rng.getrandbits(64):016x}-{i}".encode() for i in range(3)]
        payloads = self.put_pages(a, ids, rng=rng)
        probe = a.spans(PAGE)
        before = self.stats()

        a.unregister()

        def refused():
            g = self.get([transfer(ids[0], probe, a.id)])
            p = self.put([transfer(b"after-close", probe, a.id)])
            s = self.stats()
            return g != [OK] and p != [OK] and s.pools == before.pools - 1 and (g, p)

        g, p = wait_until("requests naming a closed pool fail and Stats.pools drops", refused)
        self.assertEqual((g, p), ([BAD_POOL], [BAD_POOL]))
        self.assertEqual(self.stats().pool_bytes, before.pool_bytes - POOL_BYTES)
        self.assert_daemon_lets_go([a.memfd_name], "the closed pool's memfd")
        self.assertEqual(self.put([transfer(b"after-close-2", probe, a.id)]), [BAD_POOL])
        self.assertEqual(self.exist([b"after-close-2"]), [False], "a put to a closed pool stored")

        # The other pool (same name, so the same namespace) still reads and writes.
        self.get_and_check(b, payloads)
        more = self.put_pages(b, [b"after-close-via-b"], rng=rng)
        self.get_and_check(b, more)
        # A new registration never reuses the closed pool's id.
        c = self.pool()
        self.assertNotEqual(c.id, a.id)
        self.close_and_wait([b, c])

    def test_07_malformed_registrations(self):
        base = self.stats().pools
        rng = random.Random(SEED ^ 7)
        markers = []  # what the daemon must not keep: memfd names, pipe inodes, file paths

        def memfd(size=4096):
            name = f"kvs-pytest-bad-{os.getpid()}-{next(Pool.serial)}."
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            if size:
                os.ftruncate(fd, size)
            markers.append(name)
            self.addCleanup(os.close, fd)
            return fd

        def connect():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(self.mempool_path)
            self.addCleanup(s.close)
            return s

        def send(s, data, fds):
            try:
                socket.send_fds(s, [data], fds) if fds else s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon may close before reading it all

        def preamble(name=b"sglang-test-pool", magic=MAGIC, length=None):
            return struct.pack("<QI", magic, len(name) if length is None else length) + name

        read_only = os.path.join(self.workdir, "read-only-pool")
        with open(read_only, "wb") as f:
            f.write(rng.randbytes(1 << 20))
        ro_fd = os.open(read_only, os.O_RDONLY | os.O_CLOEXEC)
        self.addCleanup(os.close, ro_fd)
        markers.append(read_only)
        pipe_r, pipe_w = os.pipe()
        self.addCleanup(os.close, pipe_r)
        self.addCleanup(os.close, pipe_w)
        markers.append(f"pipe:[{os.fstat(pipe_r).st_ino}]")

        def long_name(s):
            send(s, preamble(b"", length=100_000), [memfd()])
            send(s, b"n" * 100_000, [])

        def truncated_half_close(s):
            send(s, preamble()[:6], [memfd()])
            s.shutdown(socket.SHUT_WR)

        cases = {
            "wrong magic": lambda s: send(s, preamble(magic=MAGIC ^ 0xFF), [memfd()]),
            "no fd": lambda s: send(s, preamble(), []),
            "two fds": lambda s: send(s, preamble(), [memfd(), memfd()]),
            "name of 100000 bytes": long_name,
            "empty name": lambda s: send(s, preamble(b""), [memfd()]),
            "name of 241 bytes": lambda s: send(s, preamble(b"n" * 241), [memfd()]),
            "truncated preamble, then half-close": truncated_half_close,
            "fd of a pipe": lambda s: send(s, preamble(), [pipe_r]),
            "empty memfd": lambda s: send(s, preamble(), [memfd(size=0)]),
            "read-only fd": lambda s: send(s, preamble(), [ro_fd]),
        }
        for what, act in cases.items():
            with self.subTest(what):
                s = connect()
                act(s)
                self.assertEqual(recv_until_eof(s, 5), b"", f"{what}: the daemon answered a pool id")
                s.close()

        # Truncated preamble, then the client just goes away.
        s = connect()
        send(s, preamble()[:10], [memfd()])
        s.close()

        self.assert_daemon_lets_go(markers, "what malformed registrations sent")
        self.assertEqual(self.stats().pools, base, "a malformed registration left a pool behind")

        # The daemon still registers and serves.
        p = self.pool()
        payloads = self.put_pages(p, [b"after-malformed"], rng=rng)
        self.get_and_check(p, payloads)
        q = self.pool(name="q" * 240)  # the longest name allowed
        self.get_and_check(q, {}, missing=[b"after-malformed"])  # another name, another namespace
        self.assertEqual(self.stats().pools, base + 2)
        self.close_and_wait([p, q])

    def test_99_sigterm_with_worker_attached(self):
        # A worker that is still registered and connected must not hold up shutdown.
        p = self.pool()
        self.put_pages(p, [b"before-sigterm"])
        self.assertEqual(self.exist([b"before-sigterm"]), [True])
        rc = self.daemon.terminate(timeout=10)
        self.assertIsNotNone(rc, "daemon did not exit within 10 s of SIGTERM")
        self.assertEqual(rc, 0, "exit status after SIGTERM")


class SglangWriteThroughRestartTest(unittest.TestCase):
    """Pages of a write-through namespace reach disk as they were when BatchPut
    returned, although the worker reuses its pool pages at once (as SGLang does once a
    backup is acknowledged); a daemon restarted on the same disk serves them."""

    PAGES = 128

    def setUp(self):
        self.workdir = make_workdir("sglang-wt-")
        disk = [
            "--disk-path", os.path.join(self.workdir, "slots.kvs") + "=64MiB",
            "--disk-index-dir", os.path.join(self.workdir, "index"),
            # Synchronous disk writes keep a backlog of write-through copies queued
            # when BatchPut returns, which is where a copy that still aliases the
            # worker's pool would pick up the worker's later bytes.
            "--disk-durability", "power-loss",
        ]  # fmt: skip
        self.disk_args = disk
        self.daemon = self.start()

    def start(self):
        d = Daemon(self.workdir, self.disk_args)
        FAILED_LOGS.append(d)
        self.addCleanup(d.kill)
        return d

    def pool(self, d):
        p = Pool(d.mempool_path, name="wt-pool", size=64 * MIB, seed=SEED ^ 0x77)
        self.addCleanup(p.release)
        return p

    def test_write_through_survives_pool_reuse_and_restart(self):
        d = self.daemon
        rng = random.Random(SEED ^ 0x78)
        p = self.pool(d)
        # The first put creates the namespace (pool name, page length) ...
        warm = p.spans(PAGE)
        p.write(warm, rng.randbytes(PAGE))
        put = lambda ts: list(d.hicache.BatchPut(hicache_pb2.BatchPutRequest(puts=ts), timeout=RPC_TIMEOUT).results)
        self.assertEqual(put([transfer(b"warm", warm, p.id)]), [OK])
        # ... and the operator turns write-through on for it.
        infos = [
            ns for ns in d.kv.ListNamespaces(kvstrata_pb2.ListNamespacesRequest(), timeout=RPC_TIMEOUT).namespaces
            if ns.spec.model_id.endswith("wt-pool") and ns.block_bytes == PAGE
        ]
        self.assertEqual(len(infos), 1, f"namespaces of pool 'wt-pool': {infos}")
        r = d.kv.RegisterNamespace(
            kvstrata_pb2.RegisterNamespaceRequest(
                spec=infos[0].spec, policy=kvstrata_pb2.NamespacePolicy(write_through=True)
            ),
            timeout=RPC_TIMEOUT,
        )
        self.assertEqual(r.namespace_id, infos[0].namespace_id)

        payloads, transfers, sources = {}, [], []
        for i in range(self.PAGES):
            tid = f"wt-{i}-{rng.getrandbits(64):016x}".encode()
            # Mostly one iovec per page (the zero-copy case), some K/V pairs.
            spans = [(p.alloc(PAGE), PAGE)] if i % 4 else p.spans(PAGE)
            payloads[tid] = rng.randbytes(PAGE)
            p.write(spans, payloads[tid])
            transfers.append(transfer(tid, spans, p.id))
            sources.append(spans)
        filler = b"\x55" * PAGE
        self.assertEqual(put(transfers), [OK] * self.PAGES)
        # The worker reuses its pages at once; last first, since the disk writer works
        # through the batch in order.
        for spans in reversed(sources):
            p.write(spans, filler)

        def written():
            m = d.kv.Stats(kvstrata_pb2.StatsRequest(), timeout=RPC_TIMEOUT).movement
            return m.write_through >= self.PAGES and m.demoted >= self.PAGES and m.demote_queued_bytes == 0

        wait_until(f"{self.PAGES} write-through copies on disk", written, timeout=20)
        p.unregister()
        self.assertEqual(d.terminate(), 0, "exit status after SIGTERM")

        d2 = self.start()  # same disk: the host tier is empty, every hit comes from disk
        q = self.pool(d2)
        ids = list(payloads)
        exist = list(d2.hicache.Exist(hicache_pb2.ExistRequest(id=ids), timeout=RPC_TIMEOUT).results)
        self.assertEqual(exist, [True] * len(ids), "Exist after restart")
        dests = {tid: q.spans(PAGE) for tid in ids}
        for spans in dests.values():
            q.poison(spans)
        got = list(
            d2.hicache.BatchGet(
                hicache_pb2.BatchGetRequest(gets=[transfer(t, dests[t], q.id) for t in ids]),
                timeout=RPC_TIMEOUT,
            ).results
        )
        wrong = []
        for tid, code in zip(ids, got):
            back = q.read(dests[tid])
            if code != OK:
                wrong.append(f"{tid.decode()}: result {code}")
            elif back != payloads[tid]:
                filled = " (the bytes the worker wrote after BatchPut)" if back == filler else ""
                wrong.append(f"{tid.decode()}: {first_difference(back, payloads[tid])}{filled}")
        self.assertEqual(
            wrong, [], f"{len(wrong)} of {len(ids)} pages did not come back from disk as put"
        )
        self.assertEqual(d2.terminate(), 0)


# A worker in another process: registers an SGLang pool filled with FILL, prints its id,
# then on a line from stdin prints whether its pool still holds FILL only.
OTHER_WORKER = r"""
import mmap, os, socket, struct, sys
path, name, size, fill = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4])
fd = os.memfd_create("kvs-other-worker", os.MFD_CLOEXEC)
os.ftruncate(fd, size)
mem = mmap.mmap(fd, size)
mem[:] = bytes([fill]) * size
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
socket.send_fds(s, [struct.pack("<QI", 0x8DF6FBFD, len(name)) + name], [fd])
reply = b""
while len(reply) < 4:
    chunk = s.recv(4 - len(reply))
    if not chunk:
        sys.exit("registration refused")
    reply += chunk
print("registered", struct.unpack("<I", reply)[0], flush=True)
sys.stdin.readline()
print("intact", mem[:] == bytes([fill]) * size, flush=True)
"""


class SglangStalePoolIdTest(unittest.TestCase):
    """A pool id is good for one daemon run, and only for the process that registered
    the pool: a worker that kept its id across a daemon restart, or names another
    worker's pool, gets BAD_POOL and the other pool's bytes stay as they were."""

    def setUp(self):
        self.workdir = make_workdir("sglang-ids-")

    def start(self):
        d = Daemon(self.workdir)
        FAILED_LOGS.append(d)
        self.addCleanup(d.kill)
        return d

    def pool(self, d, seed):
        p = Pool(d.mempool_path, name="ids-pool", size=4 * MIB, seed=SEED ^ seed)
        self.addCleanup(p.release)
        return p

    def test_a_stale_id_after_a_restart_is_refused(self):
        d1 = self.start()
        stale = self.pool(d1, 0x91)
        stale_spans = stale.spans(PAGE)
        self.assertEqual(d1.terminate(), 0)
        d1.kill()
        # The same socket paths; the stale worker does not register again.
        d2 = self.start()
        fresh = self.pool(d2, 0x92)
        rng = random.Random(SEED ^ 0x93)
        spans = fresh.spans(PAGE)
        fresh.write(spans, rng.randbytes(PAGE))
        put = lambda ts: list(d2.hicache.BatchPut(hicache_pb2.BatchPutRequest(puts=ts), timeout=RPC_TIMEOUT).results)
        get = lambda ts: list(d2.hicache.BatchGet(hicache_pb2.BatchGetRequest(gets=ts), timeout=RPC_TIMEOUT).results)
        self.assertEqual(put([transfer(b"page", spans, fresh.id)]), [OK])
        # Fill the fresh pool's start (where the stale spans point) and snapshot it all.
        fresh.mem[: 2 * PAGE] = rng.randbytes(2 * PAGE)
        before = bytes(fresh.mem)
        # (The two runs' 31-bit ids collide with a chance of about 2^-31.)
        self.assertEqual(get([transfer(b"page", stale_spans, stale.id)]), [BAD_POOL])
        self.assertEqual(put([transfer(b"stale", stale_spans, stale.id)]), [BAD_POOL])
        exist = d2.hicache.Exist(hicache_pb2.ExistRequest(id=[b"stale"]), timeout=RPC_TIMEOUT)
        self.assertEqual(list(exist.results), [False])
        self.assertTrue(bytes(fresh.mem) == before, "the fresh worker's pool changed")
        # The fresh worker's own id works.
        dest = fresh.spans(PAGE)
        self.assertEqual(get([transfer(b"page", dest, fresh.id)]), [OK])
        self.assertEqual(d2.terminate(), 0)

    def test_another_process_pool_is_refused(self):
        d = self.start()
        size = 2 * PAGE
        other = subprocess.Popen(
            [sys.executable, "-c", OTHER_WORKER, d.mempool_path, "ids-pool", str(size), "90"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.addCleanup(other.kill)
        line = other.stdout.readline().split()
        self.assertEqual(line[:1], ["registered"], f"the other worker said {line}")
        other_id = int(line[1])
        mine = self.pool(d, 0x94)
        rng = random.Random(SEED ^ 0x95)
        spans = mine.spans(PAGE)
        mine.write(spans, rng.randbytes(PAGE))
        put = lambda ts: list(d.hicache.BatchPut(hicache_pb2.BatchPutRequest(puts=ts), timeout=RPC_TIMEOUT).results)
        get = lambda ts: list(d.hicache.BatchGet(hicache_pb2.BatchGetRequest(gets=ts), timeout=RPC_TIMEOUT).results)
        self.assertEqual(put([transfer(b"mine", spans, mine.id)]), [OK])
        # The other worker's id is live, but not this process's pool.
        theirs = [(0, PAGE)]
        self.assertEqual(get([transfer(b"mine", theirs, other_id)]), [BAD_POOL])
        self.assertEqual(put([transfer(b"theirs", theirs, other_id)]), [BAD_POOL])
        out, _ = other.communicate("check\n", timeout=30)
        self.assertEqual(out.split(), ["intact", "True"], "the other worker's pool changed")
        self.assertEqual(d.terminate(), 0)


def main():
    print(f"seed {SEED} (replay with KVSTRATA_TEST_SEED={SEED})", flush=True)
    argv = [sys.argv[0]] + (sys.argv[1:] or ["-v"])
    prog = unittest.main(module=__name__, argv=argv, exit=False)
    r = prog.result
    failed = len(r.failures) + len(r.errors) + len(r.unexpectedSuccesses)
    skipped = len(r.skipped)
    passed = max(r.testsRun - failed - skipped, 0)
    ok = failed == 0 and r.testsRun > 0 and r.wasSuccessful()
    if ok:
        for w in WORKDIRS:
            shutil.rmtree(w, ignore_errors=True)
    else:
        for d in FAILED_LOGS:
            print(d.log(), file=sys.stderr)
        for w in WORKDIRS:
            print(f"daemon files kept in {w}", file=sys.stderr)
    line = f"sglang: {passed} passed, {failed} failed"
    print(line + (f", {skipped} skipped" if skipped else ""), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
