"""pytest fixtures: a real daemon per test module (`daemon`), a client to it (`client`).

The daemon's log is printed when a test fails (kept in its temp directory)."""

from __future__ import annotations

import os
import random
import shutil
import time

import pytest

from kvdaemon import Daemon, workdir

SEED = int(os.environ.get("KVSTRATA_TEST_SEED", str(time.time_ns() % (1 << 32))))


def pytest_report_header(config):
    return f"kvstrata: KVSTRATA_BIN={os.environ.get('KVSTRATA_BIN')} seed={SEED} (KVSTRATA_TEST_SEED replays)"


@pytest.fixture
def rng(request):
    return random.Random(SEED ^ hash(request.node.name) & 0xFFFFFFFF)


_DAEMONS: list[Daemon] = []


@pytest.fixture(scope="module")
def daemon(request):
    """A daemon for the module, with the module's DAEMON_EXTRA flags (default: none)."""
    d = Daemon(workdir("py-"), extra=tuple(getattr(request.module, "DAEMON_EXTRA", ())))
    _DAEMONS.append(d)
    yield d
    d.stop()
    _DAEMONS.remove(d)
    shutil.rmtree(d.workdir, ignore_errors=True)


@pytest.fixture
def client(daemon):
    import kvstrata
    c = kvstrata.Client(daemon.uds_target, timeout=20)
    yield c
    c.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for d in list(_DAEMONS):
            rep.sections.append(("kvstrata daemon log", d.log()))


def pytest_sessionfinish(session, exitstatus):
    """No daemon outlives the run, whatever a test did."""
    for d in Daemon.started:
        d.stop()
