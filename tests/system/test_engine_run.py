"""Whole engine runs: a real post-copy migration between two processes, verified.

KVM runs need /dev/kvm (marker `kvm`); thread-workload runs need only userfaultfd.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket

import pytest

from pctop.engine import integrity
from pctop.engine.image import PageImage
from pctop.engine.run import Engine, EngineConfig
from pctop.engine.uffd import AnonMemory
from pctop.engine.workload import KvmWorkload, ThreadWorkload
from tests.conftest import need_uffd

MiB = 1 << 20
STRATEGIES = ("uffd", "sharded", "vcpu-exit")


def _need_kvm():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm missing or not accessible")


def _check_complete(s: dict, cfg: EngineConfig) -> None:
    assert s["type"] == "summary" and s["ok"], s["mismatch_list"] or s["errors"]
    assert s["mismatches"] == 0
    assert s["pages_verified"] == s["pages_total"] == cfg.memory // 4096
    assert s["pages_demand"] + s["pages_background"] == s["pages_total"]
    assert len(s["faults_per_vcpu"]) == len(s["stall_ns_per_vcpu"]) == cfg.vcpus
    assert s["faults_total"] == sum(s["faults_per_vcpu"])
    assert all(f > 0 for f in s["faults_per_vcpu"]), "every vCPU should have faulted"
    assert all(ns > 0 for ns in s["stall_ns_per_vcpu"])
    assert sum(sum(v["hist"]) for v in s["per_vcpu"]) == s["faults_total"]


@pytest.mark.kvm
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kvm_guest_256mib_two_vcpus_migrates_and_verifies(strategy, tmp_path):
    _need_kvm()
    need_uffd()
    # Background limited so that demand faults and the stream overlap (EEXIST races
    # happen); the guest writes 20 % of its accesses, so unwritten-page checks and
    # written-page header checks both run.
    cfg = EngineConfig(memory=256 * MiB, vcpus=2, strategy=strategy, bandwidth=512 * MiB,
                       write_ratio=0.2, control=str(tmp_path / "c.sock"), duration=60)
    s = Engine(cfg, KvmWorkload).run()
    _check_complete(s, cfg)
    assert s["workload"] == "kvm"
    assert s["pages_demand"] > 0 and s["pages_background"] > 0
    if strategy == "vcpu-exit":
        assert s["address_source"] in ("guest-assisted", "memory_fault")
        assert s["reader_threads"] == []
    else:
        assert s["address_source"] == "uffd"
        assert len(s["uffds"]) == (2 if strategy == "sharded" else 1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_threads_every_first_touch_is_a_demand_fault_without_background(strategy, tmp_path):
    need_uffd()
    cfg = EngineConfig(memory=16 * MiB, vcpus=2, strategy=strategy, background=False,
                       pattern="seq", readers=2, control="", duration=60)
    s = Engine(cfg, ThreadWorkload).run()
    _check_complete(s, cfg)
    assert s["workload"] == "threads"
    assert s["pages_background"] == 0 and s["pages_demand"] == s["pages_total"]
    assert s["faults_total"] == s["pages_total"]  # seq, sharded: each page faults exactly once
    if strategy == "uffd":
        assert len(s["reader_threads"]) == 2
        assert sum(r["msgs"] for r in s["reader_threads"]) == s["faults_total"]


def test_duration_stops_the_guest_and_pulls_the_remaining_pages():
    need_uffd()
    # hotset touches only 10 % of each shard: without background the run can only end
    # by --duration, after which the engine pulls every other page and verifies.
    cfg = EngineConfig(memory=128 * MiB, vcpus=2, strategy="uffd", background=False,
                       pattern="hotset", duration=0.3, control="")
    s = Engine(cfg, ThreadWorkload).run()
    _check_complete(s, cfg)
    assert s["pages_background"] > 0 and s["pages_demand"] > 0


def test_corrupted_page_fails_the_integrity_check():
    need_uffd()
    cfg = EngineConfig(memory=8 * MiB, vcpus=1, strategy="uffd", control="", corrupt_page=77)
    s = Engine(cfg, ThreadWorkload).run()
    assert not s["ok"] and s["state"] == "failed"
    assert s["mismatches"] == 1
    assert s["mismatch_list"] == [[77, "content differs from the source's (page not written by the guest)"]]
    assert s["pages_verified"] == s["pages_total"] - 1


def test_verify_catches_wrong_header_wrong_body_and_missing_pages():
    n, ps = 8, 4096
    img = PageImage(n, ps, seed=5)
    with AnonMemory(n * ps) as mem:
        buf = (ctypes.c_char * (n * ps)).from_address(mem.addr)
        img.fill(memoryview(buf).cast("B"), 0, n - 1)  # the last page is never touched: missing
        ctypes.memmove(mem.addr + 2 * ps, img.page(3), ps)  # page 2 holds page 3's bytes
        ctypes.memset(mem.addr + 4 * ps + 100, 0, 8)  # page 4 body changed: fine if the guest wrote it
        ctypes.memset(mem.addr + 5 * ps + 100, 0, 8)  # page 5 body changed, not by the guest
        del buf
        r = integrity.verify(mem.addr, img, dirty={4}, installs=n)
    reasons = {m.page: m.reason.split()[0] for m in r.mismatches}
    assert reasons == {2: "header", 5: "content", 7: "missing"}
    assert r.pages_verified == n - 3 and not r.ok


def _control(path: str, *reqs: dict) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        f = s.makefile("rwb")
        out = []
        for r in reqs:
            f.write(json.dumps(r).encode() + b"\n")
            f.flush()
            out.append(json.loads(f.readline()))
        return out


def test_control_socket_status_pause_resume_bandwidth(tmp_path):
    need_uffd()
    path = str(tmp_path / "engine.sock")
    # 64 MiB at 16 MiB/s would take 4 s: the test lifts the limit when it is done.
    cfg = EngineConfig(memory=64 * MiB, vcpus=2, strategy="uffd", bandwidth=16 * MiB,
                       pattern="hotset", control=path, duration=60)
    eng = Engine(cfg, ThreadWorkload)
    seen: dict = {}

    def client(e: Engine) -> None:
        if seen:
            return
        st, paused, bw_bad, unknown = _control(path, {"cmd": "status"}, {"cmd": "pause"},
                                               {"cmd": "bandwidth", "arg": "fast"}, {"cmd": "nope"})
        st2, = _control(path, {"cmd": "status"})
        resumed, bw = _control(path, {"cmd": "resume"}, {"cmd": "bandwidth", "arg": 0})
        seen.update(st=st, paused=paused, bw_bad=bw_bad, unknown=unknown, st2=st2, resumed=resumed, bw=bw)

    s = eng.run(on_tick=client, tick_s=0.3)
    _check_complete(s, cfg)
    st = seen["st"]
    assert st["type"] == "status" and st["ok"] and st["pid"] == os.getpid()
    assert st["strategy"] == "uffd" and st["vcpus"] == 2 and st["workload"] == "threads"
    assert st["state"] == "postcopy" and st["background"] == "running"
    assert st["bandwidth_limit_bps"] == 16 * MiB and st["address_source"] == "uffd"
    assert st["pages_total"] == 16384 and 0 < st["pages_received"] < 16384
    assert len(st["per_vcpu"]) == 2 and all(len(v["hist"]) == 24 for v in st["per_vcpu"])
    assert st["per_vcpu"][0]["tid"] > 0 and len(st["reader_threads"]) == 1 and len(st["uffds"]) == 1
    assert seen["paused"] == {"type": "reply", "ok": True, "cmd": "pause"}
    assert seen["st2"]["background"] == "paused" and seen["st2"]["state"] == "postcopy"
    assert seen["bw_bad"]["ok"] is False and "bandwidth" in seen["bw_bad"]["error"]
    assert seen["unknown"] == {"type": "reply", "ok": False, "cmd": "nope", "error": "unknown command 'nope'"}
    assert seen["resumed"]["ok"] and seen["bw"]["ok"]
    assert not os.path.exists(path)  # removed at the end of the run


def test_source_dying_mid_run_fails_fast_and_cleans_up():
    need_uffd()
    cfg = EngineConfig(memory=64 * MiB, vcpus=2, strategy="uffd", background=False, control="", duration=60)
    eng = Engine(cfg, ThreadWorkload)

    def kill_source(e: Engine) -> None:
        if e.source_proc.poll() is None:
            e.source_proc.kill()

    with pytest.raises(Exception, match="source process exited|link closed|Connection|Broken"):
        eng.run(on_tick=kill_source, tick_s=0.2)
    assert eng.state == "failed"
    assert eng.source_proc.poll() is not None
    assert not any(t.is_alive() for t in eng.workload._threads)  # blocked vCPUs were released
