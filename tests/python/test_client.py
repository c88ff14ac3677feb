"""kvstrata.Client against the real daemon: every RPC, targets, auth, errors, hashing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time

import grpc
import pytest

import kvstrata
from kvstrata import pb
from kvdaemon import Daemon, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMALL = kvstrata.NamespaceSpec(model_id="pytest-small", num_layers=2, num_kv_heads=2, head_dim=8,
                               dtype="f16", block_tokens=2)  # 2*2*2*2*8*2 = 256-byte blocks


def payloads(rng, n, size):
    return [rng.randbytes(size) for _ in range(n)]


# --- hashing -----------------------------------------------------------------------------


def parse_vectors():
    text = open(os.path.join(ROOT, "docs", "hashing.md"), encoding="utf-8").read()
    vectors = []
    for block in re.findall(r"```vector\n(.*?)```", text, re.S):
        v = {"tokens": []}
        for line in block.strip().splitlines():
            k, _, val = (s.strip() for s in line.partition("="))
            if k == "tokens":
                if ".." in val:
                    a, b = val.split("..")
                    toks = list(range(int(a), int(b)))
                else:
                    toks = [int(x) for x in val.split(",")]
                v["tokens"].append((toks, []))
            elif k == "key":
                v["tokens"][-1][1].append(val)
            else:
                v[k] = val
        vectors.append(v)
    return vectors


VECTORS = parse_vectors()


def test_hashing_vectors_of_docs():
    assert len(VECTORS) == 4, "docs/hashing.md should hold 4 vectors"
    for v in VECTORS:
        spec = kvstrata.NamespaceSpec(
            model_id=v["model_id"], model_fingerprint=bytes.fromhex(v["model_fingerprint"]),
            num_layers=int(v["num_layers"]), num_kv_heads=int(v["num_kv_heads"]),
            head_dim=int(v["head_dim"]), dtype=v["dtype"], block_tokens=int(v["block_tokens"]),
            layout=v["layout"], tp_rank=int(v["tp_rank"]), tp_size=int(v["tp_size"]),
            opaque_block_bytes=int(v["opaque_block_bytes"]))
        assert spec.canonical_encoding().hex() == v["encoding"], v["name"]
        assert spec.namespace_id().hex() == v["namespace_id"], v["name"]
        assert spec.block_bytes() == int(v["block_bytes"]), v["name"]
        assert v["tokens"], v["name"]
        for toks, keys in v["tokens"]:
            got = kvstrata.block_keys(spec.namespace_id(), toks, spec.block_tokens)
            assert [k.hex() for k in got] == keys, v["name"]
            # chain_keys continues a chain: block by block gives the same keys
            prev, step = spec.namespace_id(), []
            for i in range(len(keys)):
                prev = kvstrata.next_block_key(prev, toks[i * spec.block_tokens:(i + 1) * spec.block_tokens])
                step.append(prev.hex())
            assert step == keys


def test_hashing_refuses_bad_tokens():
    with pytest.raises(ValueError, match="tokens"):
        kvstrata.block_keys(bytes(16), [1, -1], 2)
    with pytest.raises(ValueError, match="prev"):
        kvstrata.next_block_key(b"short", [1])


def test_daemon_agrees_on_namespace_ids(client):
    for v in VECTORS[:1] + VECTORS[2:]:
        spec = kvstrata.NamespaceSpec(
            model_id=v["model_id"], model_fingerprint=bytes.fromhex(v["model_fingerprint"]),
            num_layers=int(v["num_layers"]), num_kv_heads=int(v["num_kv_heads"]),
            head_dim=int(v["head_dim"]), dtype=v["dtype"], block_tokens=int(v["block_tokens"]),
            layout=v["layout"], tp_rank=int(v["tp_rank"]), tp_size=int(v["tp_size"]),
            opaque_block_bytes=int(v["opaque_block_bytes"]))
        ns = client.register_namespace(spec)
        assert ns.id.hex() == v["namespace_id"]
        assert ns.block_bytes == int(v["block_bytes"])


# --- targets -----------------------------------------------------------------------------


def test_target_forms(monkeypatch):
    p = kvstrata.parse_target
    assert p("unix:///run/k.sock") == kvstrata.target.Target("unix", "/run/k.sock")
    assert p("unix:/run/k.sock").address == "/run/k.sock"
    assert p("/run/k.sock").kind == "unix"
    assert p("127.0.0.1:50051") == kvstrata.target.Target("http", "127.0.0.1:50051")
    assert p("http://h:1").grpc_target() == "h:1"
    assert p("https://h:443").kind == "https"
    assert p("[::1]:5").address == "[::1]:5"
    for bad, why in [("", "empty"), ("unix:rel/p", "absolute"), ("ftp://h:1", "scheme"),
                     ("host", "host:port"), ("h:99999", "port"), ("::1:5", "bracketed"),
                     ("http://h:1/x", "path")]:
        with pytest.raises(kvstrata.TargetError, match=why):
            p(bad)
    monkeypatch.setenv("KVSTRATA_ADDR", "unix:///env/k.sock")
    assert p(None).address == "/env/k.sock"
    monkeypatch.delenv("KVSTRATA_ADDR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent-xdg")
    assert kvstrata.default_uds_path() == "/nonexistent-xdg/kvstrata/kvstrata.sock"
    assert kvstrata.default_target() == "http://127.0.0.1:50051"


def test_default_socket_discovery_and_env(monkeypatch):
    """A daemon on $XDG_RUNTIME_DIR/kvstrata/kvstrata.sock is found by Client() alone;
    KVSTRATA_ADDR wins over it."""
    d = workdir("xdg-")
    os.makedirs(os.path.join(d, "kvstrata"))
    daemon = Daemon(d, uds_path=os.path.join(d, "kvstrata", "kvstrata.sock"), tcp_addr="127.0.0.1:0")
    try:
        monkeypatch.delenv("KVSTRATA_ADDR", raising=False)
        monkeypatch.setenv("XDG_RUNTIME_DIR", d)
        with kvstrata.Client(timeout=10) as c:
            assert c.target.kind == "unix"
            assert c.register_namespace(SMALL).block_bytes == 256
        monkeypatch.setenv("KVSTRATA_ADDR", daemon.tcp)
        with kvstrata.Client(timeout=10) as c:
            assert c.target.kind == "http"
            assert c.stats().version
    finally:
        daemon.stop()
        shutil.rmtree(d, ignore_errors=True)


# --- data --------------------------------------------------------------------------------


def test_inline_round_trip_lookup_and_inspection(client, rng):
    ns = client.register_namespace(SMALL)
    assert ns.id == SMALL.namespace_id() and ns.block_bytes == 256
    again = client.register_namespace(SMALL)
    assert again.id == ns.id and not again.created
    tokens = [rng.randrange(50000) for _ in range(2 * 6 + 1)]
    keys = ns.block_keys(tokens)
    assert len(keys) == 6
    data = payloads(rng, 6, 256)
    put = client.batch_put(ns, keys[:4], data[:4], parents="chain")
    assert list(put.results) == [kvstrata.PutStatus.Value("PUT_STATUS_STORED")] * 4 and put.stored == 4
    assert client.lookup(ns, keys).matched == 4
    assert client.lookup(ns, keys[1:]).matched == 3
    assert client.lookup(ns, [keys[4]] + keys[:2]).matched == 0
    before = client.stats()
    got = client.batch_get(ns, keys)
    assert got[:4] == data[:4] and got[4:] == [None, None]
    after = client.stats()
    hits = lambda s: [t for t in s.tiers if t.tier == pb.TIER_HOST][0].hits  # noqa: E731
    misses = lambda s: [t for t in s.tiers if t.tier == pb.TIER_HOST][0].misses  # noqa: E731
    assert hits(after) - hits(before) == 4
    assert misses(after) - misses(before) == 2
    # numpy payloads are accepted as they are
    import numpy as np
    arr = np.frombuffer(data[4], dtype=np.uint8)
    assert client.batch_put(ns, [keys[4]], [arr], parents=[keys[3]]).stored == 1
    assert client.batch_get(ns, [keys[4]]) == [data[4]]
    blocks = {bytes(b.key): b for b in client.list_blocks(ns, page_size=2)}
    assert set(blocks) == set(keys[:5])
    assert bytes(blocks[keys[1]].parent) == keys[0] and blocks[keys[0]].children == 1
    insp = client.inspect(ns, keys[2])
    assert insp.checksum_ok and insp.block.payload_bytes == 256
    assert any(bytes(i.namespace_id) == ns.id for i in client.list_namespaces())
    streamed = list(client.get_stream(ns, keys[:3] + [b"missing"]))
    assert [bytes(r.payload) for r in streamed[:3]] == data[:3] and not streamed[3].found
    resp = client.put_stream([
        pb.BatchPutRequest(namespace_id=ns.id, items=[pb.PutItem(key=b"s1", payload=data[5])]),
        pb.BatchPutRequest(namespace_id=ns.id, items=[pb.PutItem(key=b"s2", parent=b"s1", payload=data[0])]),
    ])
    assert [r.stored for r in resp] == [1, 1]
    assert client.batch_get(ns, [b"s2"]) == [data[0]]
    ev = client.evict(ns, [keys[4]])
    assert ev.evicted == 1 and client.lookup(ns, keys).matched == 4
    assert client.delete(ns, keys[:2] + [b"nope"]) == 2
    assert client.lookup(ns, keys).matched == 0


def test_pins_are_leases_released_on_exit(client, rng):
    ns = client.register_namespace(SMALL)
    keys = [b"pin-a", b"pin-b"]
    client.batch_put(ns, keys, payloads(rng, 2, 256))
    base = client.stats().active_leases
    with client.pin(ns, keys, lease_ms=60_000) as lease:
        assert lease.lease_id > 0 and lease.deadline_unix_ms > time.time() * 1000
        assert client.stats().active_leases == base + 1
        assert client.evict(ns, keys).skipped_pinned == 2
    assert client.stats().active_leases == base
    assert client.evict(ns, keys).evicted == 2
    with pytest.raises(kvstrata.FailedPrecondition) as e:
        client.pin(ns, [b"never-stored"])
    assert e.value.field == "keys[0]" and e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(kvstrata.NotFound) as e:
        client.unpin(999_999)
    assert e.value.field == "lease_id"


def test_errors_carry_code_and_field(client, rng):
    ns = client.register_namespace(SMALL)
    with pytest.raises(kvstrata.InvalidArgument) as e:
        client.batch_put(ns, [b"k"], [b"abc"])
    assert e.value.field == "items[0].payload" and "256" in e.value.reason
    with pytest.raises(kvstrata.NotFound) as e:
        client.batch_get(bytes(16), [b"k"])
    assert e.value.field == "namespace_id"
    with pytest.raises(kvstrata.InvalidArgument) as e:
        client.lookup(b"abc", [b"k"])
    assert e.value.field == "namespace_id"
    with pytest.raises(kvstrata.InvalidArgument) as e:
        client.batch_put(ns, [b""], [rng.randbytes(256)])
    assert e.value.field == "items[0].key"
    with pytest.raises(kvstrata.InvalidArgument) as e:
        client.register_namespace(kvstrata.NamespaceSpec(model_id="x", num_layers=1, num_kv_heads=1,
                                                         head_dim=0, dtype="f16", block_tokens=1))
    assert e.value.field == "spec.head_dim"
    with pytest.raises(kvstrata.InvalidArgument) as e:
        client.pin(ns, [b"k"], lease_ms=0)
    assert e.value.field == "lease_ms"
    with pytest.raises(kvstrata.FailedPrecondition) as e:
        client.verify()
    assert isinstance(e.value, kvstrata.RpcError) and e.value.method == "Verify"
    with pytest.raises(ValueError, match="payloads"):
        client.batch_put(ns, [b"a", b"b"], [b"x"])
    # a refused request changed nothing
    assert client.lookup(ns, [b"k"]).matched == 0


def test_watch_iterator(client, rng):
    ns = client.register_namespace(SMALL)
    events = []

    with client.watch(ns) as w:
        def consume():
            for ev in w:
                events.append(ev)
                if len(events) == 3:
                    return
        t = threading.Thread(target=consume, daemon=True)
        t.start()
        time.sleep(0.3)  # the stream is open before the puts
        client.batch_put(ns, [b"w1", b"w2"], payloads(rng, 2, 256), parents="chain")
        client.delete(ns, [b"w1"])
        t.join(10)
    assert not t.is_alive(), f"watch delivered {len(events)} of 3 events"
    kinds = [(e.kind, bytes(e.key)) for e in events]
    assert kinds == [(pb.EVENT_KIND_STORED, b"w1"), (pb.EVENT_KIND_STORED, b"w2"), (pb.EVENT_KIND_DELETED, b"w1")]
    assert events[1].seq == events[0].seq + 1 and bytes(events[1].parent) == b"w1"


def test_the_client_splits_at_the_max_batch_the_daemon_gives(rng):
    """A daemon with a smaller `server.max_batch` says so when a namespace is registered;
    lookups, deletes, evicts and page-free puts of more keys then still go through (as
    several requests), while a fresh client's one long lookup is refused."""
    d = workdir("maxbatch-")
    daemon = None
    try:
        daemon = Daemon(d, extra=("--max-batch", "100"))
        c = kvstrata.Client(daemon.uds_target, timeout=10)
        assert c.max_batch == kvstrata.client.MAX_BATCH
        ns = c.register_namespace(SMALL)
        assert c.max_batch == 100
        keys = [b"k%03d" % i for i in range(250)]
        for i in range(0, 250, 100):
            c.batch_put(ns, keys[i:i + 100], payloads(rng, len(keys[i:i + 100]), 256), parents="chain")
        assert c.lookup(ns, keys).matched == 250
        assert c.lookup(ns, keys[:120] + [b"gap"] + keys[121:]).matched == 120
        fresh = kvstrata.Client(daemon.uds_target, timeout=10)
        with pytest.raises(kvstrata.KvstrataError) as e:
            fresh.lookup(ns, keys[:101])
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "keys" in str(e.value)
        assert c.delete(ns, keys) == 250
        assert c.lookup(ns, keys).matched == 0
        ev = c.evict(ns, keys)
        assert (ev.evicted, ev.skipped_pinned) == (0, 0)
        c.close()
        fresh.close()
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_dead_daemon_is_unavailable_quickly(rng):
    d = workdir("dead-")
    daemon = None
    try:
        c = kvstrata.Client("unix://" + os.path.join(d, "nobody.sock"), timeout=2)
        t0 = time.monotonic()
        with pytest.raises(kvstrata.Unavailable) as e:
            c.stats()
        assert time.monotonic() - t0 < 5 and e.value.code == grpc.StatusCode.UNAVAILABLE
        daemon = Daemon(d)
        c2 = kvstrata.Client(daemon.uds_target, timeout=2)
        ns = c2.register_namespace(SMALL)
        c2.batch_put(ns, [b"x"], payloads(rng, 1, 256))
        daemon.kill()
        with pytest.raises((kvstrata.Unavailable, kvstrata.DeadlineExceeded)):
            c2.batch_get(ns, [b"x"])
        daemon.start()  # a restarted daemon without a disk tier: namespaces are gone
        deadline = time.monotonic() + 15
        while True:  # the channel reconnects after its backoff
            try:
                c2.stats()
                break
            except kvstrata.Unavailable:
                assert time.monotonic() < deadline, "the client did not reconnect to the restarted daemon"
                time.sleep(0.2)
        with pytest.raises(kvstrata.NotFound):
            c2.batch_get(ns, [b"x"])
        assert c2.register_namespace(SMALL).id == ns.id
        assert c2.batch_get(ns, [b"x"]) == [None]
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(d, ignore_errors=True)


# --- auth and TLS ------------------------------------------------------------------------


def test_bearer_token_on_tcp(tmp_path, rng):
    token_file = tmp_path / "tokens"
    token_file.write_text("# tokens\ns3cret-token-0123456789\n")
    d = workdir("auth-")
    daemon = Daemon(d, extra=("--token-file", str(token_file)))
    try:
        with kvstrata.Client(daemon.tcp, timeout=5) as c:
            with pytest.raises(kvstrata.Unauthenticated) as e:
                c.stats()
            assert e.value.field == "authorization"
        with kvstrata.Client(daemon.tcp, token="wrong", timeout=5) as c:
            with pytest.raises(kvstrata.Unauthenticated):
                c.stats()
        with kvstrata.Client(daemon.tcp, token_file=str(token_file), timeout=5) as c:
            ns = c.register_namespace(SMALL)
            assert c.batch_put(ns, [b"t"], payloads(rng, 1, 256)).stored == 1
    finally:
        daemon.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_tls(tmp_path, rng):
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make the test certificates"
    ca_key, ca, key, csr, cert = (str(tmp_path / n) for n in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem"))
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run = lambda *a: subprocess.run([openssl, *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
        "-subj", "/CN=kvstrata-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
        "-days", "2", "-extfile", str(ext))
    d = workdir("tls-")
    daemon = Daemon(d, extra=("--tls-cert", cert, "--tls-key", key))
    try:
        port = daemon.tcp.rsplit(":", 1)[1]
        with kvstrata.Client(f"https://localhost:{port}", tls_ca=ca, timeout=10) as c:
            ns = c.register_namespace(SMALL)
            data = payloads(rng, 1, 256)
            c.batch_put(ns, [b"tls"], data)
            assert c.batch_get(ns, [b"tls"]) == data
        with kvstrata.Client(f"http://127.0.0.1:{port}", timeout=3) as c:  # plaintext to a TLS port
            with pytest.raises(kvstrata.RpcError):
                c.stats()
    finally:
        daemon.stop()
        shutil.rmtree(d, ignore_errors=True)
