"""Starts and stops a real `kvstrata serve` for the Python tests.

The daemon binary is $KVSTRATA_BIN (tests/python/run.sh sets it). Each daemon gets a
temp directory with its Unix sockets (gRPC, mempool, KV region), an ephemeral TCP port
and a ready file; `Daemon.ready` holds the bound addresses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Optional, Sequence


def workdir(prefix: str) -> str:
    base = os.environ.get("KVSTRATA_TEST_TMP") or None
    if base:
        os.makedirs(base, exist_ok=True)
    d = tempfile.mkdtemp(prefix=prefix, dir=base)
    if len(d) > 70:  # Unix socket paths are limited to 107 bytes
        shutil.rmtree(d)
        d = tempfile.mkdtemp(prefix="kvs-" + prefix)
    return d


def thread_states(pid: int) -> list[str]:
    """The scheduler state (`R`, `S`, `T`, ...) of every thread of process `pid`."""
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:  # the thread ended
            pass
    return states


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP, then wait until EVERY thread of `pid` is stopped. kill() returns before
    that: until each thread has been scheduled and taken the stop, the process still
    serves requests (on a loaded 2-core machine, 40% of lookups sent right after
    kill(SIGSTOP) were answered), and the first thread (/proc/PID/stat) often shows `T`
    while others still run."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = thread_states(pid)
        if all(s in ("T", "t") for s in states):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} did not stop after SIGSTOP (thread states {states})")
        time.sleep(0.001)


class Daemon:
    """One `kvstrata serve` in `workdir` (see the module docs)."""

    started: list["Daemon"] = []  # every daemon of this process (conftest stops leftovers)

    def __init__(self, workdir: str, extra: Sequence[str] = (), host_capacity: str = "256MiB",
                 tcp_addr: str = "127.0.0.1:0", uds_path: Optional[str] = None) -> None:
        binary = os.environ.get("KVSTRATA_BIN", "")
        if not binary or not os.access(binary, os.X_OK):
            raise RuntimeError(f"KVSTRATA_BIN={binary!r} is not an executable daemon binary")
        self.binary = binary
        self.workdir = workdir
        self.mempool_path = os.path.join(workdir, "mempool.sock")
        self.region_path = os.path.join(workdir, "region.sock")
        self.uds_path = uds_path or os.path.join(workdir, "kv.sock")
        self.ready_path = os.path.join(workdir, "ready.json")
        self.log_path = os.path.join(workdir, "daemon.log")
        self.cmd = [
            binary, "serve",
            "--tcp-addr", tcp_addr,
            "--uds-path", self.uds_path,
            "--metrics-addr", "",
            "--host-capacity", host_capacity,
            "--mempool-socket", self.mempool_path,
            "--kv-region-socket", self.region_path,
            "--ready-file", self.ready_path,
            "--log-level", "info",
            *extra,
        ]  # fmt: skip
        self.proc: Optional[subprocess.Popen] = None
        Daemon.started.append(self)
        self.start()

    def start(self) -> None:
        if os.path.exists(self.ready_path):
            os.unlink(self.ready_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTRATA_") and k != "RUST_LOG"}
        env["NO_COLOR"] = "1"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode} before it was ready:\n{self.log()}")
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

    @property
    def tcp(self) -> str:
        return self.ready["tcp"]

    @property
    def uds_target(self) -> str:
        return "unix://" + self.ready["uds"]

    def log(self, tail: int = 6000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError as e:
            return f"(no daemon log: {e})"
        return f"--- daemon log {self.log_path} (tail) ---\n{text[-tail:]}\n--- end of daemon log ---"

    def kill(self) -> None:
        """SIGKILL (no clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """SIGCONT (in case it was stopped), then SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP, and wait until the kernel shows every thread of the daemon stopped."""
        assert self.proc is not None
        stop_process(self.proc.pid)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
