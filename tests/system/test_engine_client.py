"""The engine control-socket client (pctop.sources.engine).

Most tests talk to a tiny in-test unix-socket server speaking the documented
contract (docs/engine-control.md): a stand-in protocol peer whose cumulative
counters the test advances, so diffing, identities, controls and lost-engine
handling are checked exactly. The last test watches the real reference engine.
"""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest

from pctop.sources.engine import EngineSource, EngineUnreachable, find_engine_sockets
from pctop.stats import Stats


class ContractServer:
    """Answers one JSON line per request line, as the engine's control socket does."""

    def __init__(self, path: str, pid: int = 4321):
        self.path = path
        self.status = {
            "type": "status", "ok": True, "pid": pid, "state": "postcopy", "strategy": "uffd",
            "readers": 1, "vcpus": 2, "workload": "kvm", "address_source": "uffd", "elapsed_s": 1.0,
            "pages_total": 1000, "pages_received": 100, "pages_demand": 10, "pages_background": 90,
            "bytes_received": 100 * 4096, "bandwidth_bps": 2e8, "bandwidth_limit_bps": 0,
            "background": "running", "eexist": 0,
            "per_vcpu": [{"vcpu": 0, "tid": 5001, "faults": 10, "stall_ns": 1_000_000, "max_ns": 300_000,
                          "hist": [0] * 24},
                         {"vcpu": 1, "tid": 5002, "faults": 0, "stall_ns": 0, "max_ns": 0, "hist": [0] * 24}],
            "reader_threads": [{"tid": 5003, "busy_ns": 5000, "msgs": 10, "reads": 4}],
            "uffds": [{"fd": 7, "pending": 1, "total": 2}]}
        self.requests: list[dict] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn, conn.makefile("rb") as rf:
            for line in rf:
                req = json.loads(line)
                self.requests.append(req)
                if req["cmd"] == "status":
                    reply = self.status
                elif req["cmd"] in ("pause", "resume", "bandwidth"):
                    reply = {"type": "reply", "ok": True, "cmd": req["cmd"]}
                else:
                    reply = {"type": "reply", "ok": False, "cmd": req["cmd"],
                             "error": f"unknown command {req['cmd']}"}
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    return

    def advance(self, vcpu0_faults: int, stall_ns: int, bucket: int, pages: int, max_ns: int = 0):
        v = self.status["per_vcpu"][0]
        v["max_ns"] = max(v["max_ns"], max_ns)
        self.status["reader_threads"][0]["reads"] += 1
        v["faults"] += vcpu0_faults
        v["stall_ns"] += stall_ns
        v["hist"][bucket] += vcpu0_faults
        self.status["pages_received"] += pages
        self.status["bytes_received"] += pages * 4096
        self.status["reader_threads"][0]["msgs"] += vcpu0_faults

    def close(self):
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)  # really end it: the serving thread holds a makefile
            except OSError:
                pass
        self.sock.close()
        os.unlink(self.path)


@pytest.fixture
def server(tmp_path):
    s = ContractServer(str(tmp_path / "engine-4321.sock"))
    yield s
    try:
        s.close()
    except OSError:
        pass


def test_first_status_is_a_baseline_then_counters_are_diffed(server):
    src = EngineSource([server.path], discover=False)
    src.start()
    try:
        r = src.collect()
        assert [t.faults for t in r.threads] == [0, 0]  # 10 faults happened before we looked
        server.advance(vcpu0_faults=5, stall_ns=500_000, bucket=6, pages=50, max_ns=200_000)
        r = src.collect()
        t0 = {t.tid: t for t in r.threads}[5001]
        assert t0.max_ns == 0  # below the run's record (300 us): this interval's max is unknown
        server.advance(vcpu0_faults=5, stall_ns=500_000, bucket=6, pages=50, max_ns=400_000)
        r = src.collect()
    finally:
        src.close()
    t0 = {t.tid: t for t in r.threads}[5001]
    assert (t0.faults, t0.stall_ns, t0.hist[6], sum(t0.hist), t0.max_ns) == (5, 500_000, 5, 5, 400_000)
    assert {(i.tid, i.vcpu, i.how) for i in r.identities} == {(5001, 0, "engine"), (5002, 1, "engine")}
    (c,) = r.uffds
    assert (c.fd, c.msgs_read, c.read_calls, c.pages_installed, c.bytes_installed) == (7, 5, 1, 50, 50 * 4096)
    (m,) = r.migrations
    assert (m.state, m.pages_received, m.extra["strategy"], m.extra["address_source"]) == \
        ("postcopy", 200, "uffd", "uffd")


def test_stats_over_the_engine_gives_rates_identities_and_migration(server):
    src = EngineSource([server.path], discover=False)
    src.start()
    st = Stats([src], "procfs")
    try:
        st.collect()
        server.advance(vcpu0_faults=100, stall_ns=200_000_000, bucket=10, pages=400)
        s = st.collect()
    finally:
        st.close()
    (t,) = s.targets
    assert t.pid == 4321
    v0 = t.vcpus[0]
    assert (v0.vcpu, v0.identity, v0.faults) == (0, "engine", 100)
    assert v0.faults_per_s == pytest.approx(100 / s.interval_s)
    assert 1024 <= v0.p50_us < 2048 and v0.max_us is None  # the engine publishes no maximum
    assert t.migration.pages_received == 500 and t.migration.eta_s is not None


def test_controls_go_through_send(server):
    src = EngineSource([server.path], discover=False)
    src.start()
    try:
        src.collect()
        assert src.send("pause")["ok"] is True
        assert src.send("bandwidth", 1_000_000, pid=4321)["ok"] is True
        bad = src.send("explode")
        assert bad["ok"] is False and "explode" in bad["error"]
        with pytest.raises(EngineUnreachable, match="no single engine"):
            src.send("pause", pid=1)
    finally:
        src.close()
    assert {"cmd": "bandwidth", "arg": 1_000_000} in server.requests


def test_an_engine_that_goes_away_is_reported_gone(server):
    src = EngineSource([server.path], discover=False)
    src.start()
    try:
        src.collect()
        server.close()
        r = src.collect()
        assert r.gone == (4321,) and "lost engine" in r.events[0]
        assert src.collect().gone == ()
    finally:
        src.close()


def test_discovery_by_socket_name(server, tmp_path):
    run_dir = str(tmp_path)
    assert find_engine_sockets(run_dir) == [server.path]
    assert find_engine_sockets(run_dir, pids=[1]) == []
    src = EngineSource(run_dir=run_dir)
    src.start()
    try:
        r = src.collect()
        assert [m.pid for m in r.migrations] == [4321]
    finally:
        src.close()


def test_a_named_socket_that_does_not_answer_is_an_error(tmp_path):
    with pytest.raises(EngineUnreachable, match="cannot connect"):
        EngineSource([str(tmp_path / "nope.sock")], discover=False).start()


ENGINE_RUN = """
import json, sys
from pctop.engine.run import Engine, EngineConfig
from pctop.engine.workload import ThreadWorkload
cfg = EngineConfig(memory=64 << 20, vcpus=2, strategy="uffd", bandwidth=8 << 20, pattern="hotset",
                   control=sys.argv[1], duration=60)
print(json.dumps(Engine(cfg, ThreadWorkload).run()), flush=True)
"""


def test_against_the_real_engine_counts_controls_and_exit(tmp_path):
    """The reference engine (pctop.engine, thread workload: needs only userfaultfd)
    watched from outside by the engine client and the procfs source together."""
    import subprocess
    import sys
    import time

    from pctop.sources.procfs import ProcfsSource
    from tests.conftest import ROOT, need_uffd

    need_uffd()
    path = str(tmp_path / "engine.sock")
    eng = subprocess.Popen([sys.executable, "-c", ENGINE_RUN, path], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    st = None
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline and eng.poll() is None:
            time.sleep(0.05)
        assert os.path.exists(path), eng.stderr.read() if eng.poll() is not None else "no socket"
        engine = EngineSource([path], discover=False)
        procfs = ProcfsSource([eng.pid])
        engine.start()
        procfs.start()
        st = Stats([engine, procfs], "procfs")
        samples = []
        for _ in range(3):
            time.sleep(0.3)
            samples.append(st.collect())
        (t,) = samples[-1].targets
        assert t.pid == eng.pid and t.comm and t.migration.source == "engine"
        assert sorted(v.vcpu for v in t.vcpus if v.identity == "engine") == [0, 1]
        assert t.uffds and all(u.fd >= 0 for u in t.uffds)
        assert engine.send("pause")["ok"] is True
        time.sleep(0.3)
        m = st.collect().targets[0].migration
        # The stream pauses, the migration goes on ("paused" is for a link that is down).
        assert (m.state, m.extra["background"]) == ("postcopy", "paused")
        assert engine.send("resume")["ok"] and engine.send("bandwidth", 0)["ok"]
        while time.monotonic() < deadline:  # the run completes and the engine exits
            time.sleep(0.3)
            s = st.collect()
            samples.append(s)
            if any(e.kind == "target-gone" for e in s.events):
                break
        out, err = eng.communicate(timeout=30)
    finally:
        if st is not None:
            st.close()
        eng.kill()
        eng.wait()
    assert any(e.kind == "target-gone" for e in samples[-1].events), err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["ok"], summary
    seen = sum(v.faults for s in samples for t in s.targets for v in t.vcpus)
    assert 0 < seen <= summary["faults_total"]  # counted from our first look on
    # The exit interval still lists the engine's process (its last counts) but
    # the engine socket is gone with it, so only that sample has no migration.
    assert all(t.migration for s in samples[:-1] for t in s.targets)
    received = [t.migration.pages_received for s in samples for t in s.targets if t.migration]
    assert received == sorted(received) and received[-1] <= summary["pages_total"]


def test_ctl_lists_its_commands_and_refuses_what_it_would_ignore():
    from pctop.cli.ctl import COMMANDS
    from pctop.engine.run import COMMANDS as ENGINE_COMMANDS
    from tests.conftest import run_pctop

    assert tuple(COMMANDS) == ENGINE_COMMANDS  # the help lists exactly what the engine takes
    for args in (("--help",), ("help",)):
        r = run_pctop("ctl", *args)
        assert r.returncode == 0 and all(f"  {name} " in r.stdout for name in COMMANDS), r.stdout
    for args, says in ((("pause", "now"), "pause takes no argument, got 'now'"),
                       (("frob",), "unknown command 'frob'"),
                       (("pause", "a", "b"), "unexpected extra argument")):
        r = run_pctop("ctl", "--control", "/nonexistent.sock", *args)
        assert r.returncode == 2 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
