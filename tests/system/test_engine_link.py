"""The engine across a network: `pctop engine source` and `pctop engine dest` as two
processes, in two network namespaces joined by a veth pair (tests/helpers/netns.py), with
link failures during post-copy, a source that dies, and refused peers.

Link faults: `tc netem` is used where the kernel has it. On this project's machines it
does not (CONFIG_NET_SCH_NETEM is off: "Specified qdisc kind is unknown"), so loss comes
from an nftables rule (`numgen random mod 100 < N drop`) and demand-reply delay from the
engine's own `latency` control; dead links are `ip link set down` and an nftables
drop-all rule. All traffic stays on the private 10.213.N.0/30 link between the two
namespaces the test creates and deletes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from pctop.engine import transport as T
from tests.conftest import ROOT
from tests.helpers.netns import VethLink, can_make_netns
from tests.helpers.procs import engine_request

PCTOP = [sys.executable, "-m", "pctop"]
MEM = "64M"


def _need_link():
    why = can_make_netns()
    if why:
        pytest.skip(why)
    if not os.path.exists("/dev/userfaultfd") and not os.path.exists("/proc/sys/vm/unprivileged_userfaultfd"):
        pytest.skip("userfaultfd unavailable")


@pytest.fixture
def link():
    _need_link()
    with VethLink() as ln:
        yield ln


@pytest.fixture
def procs():
    """Processes started by a test; killed (and reaped) even when the test fails."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        try:
            p.communicate(timeout=10)
        except (subprocess.TimeoutExpired, ValueError):
            pass


def _token_file(tmp_path, text="s3cret-token") -> str:
    p = tmp_path / "token"
    p.write_text(text + "\n")
    os.chmod(p, 0o600)
    return str(p)


def _start_source(procs, link, tmp_path, *extra, side="a", token=None) -> tuple[subprocess.Popen, str]:
    host = link.addr[side] if link else "127.0.0.1"
    argv = PCTOP + ["engine", "source", "--listen", f"{host}:0", "--memory", MEM, "--wait", "30", *extra]
    if token:
        argv += ["--token-file", token]
    if link:
        p = link.popen(side, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    else:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    procs.append(p)
    line = p.stdout.readline()
    assert line, f"source did not start: {p.stderr.read()}"
    msg = json.loads(line)
    assert msg["type"] == "listening"
    return p, msg["address"]


def _start_dest(procs, link, address, control, *extra, token=None) -> subprocess.Popen:
    argv = PCTOP + ["engine", "dest", "--connect", address, "--memory", MEM, "--vcpus", "2",
                    "--json", "--control", control, *extra]
    if token:
        argv += ["--token-file", token]
    if link:
        p = link.popen("b", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    else:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    procs.append(p)
    return p


def _wait(control: str, pred, what: str, timeout: float = 15, proc=None) -> dict:
    deadline = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: destination exited {proc.returncode}: {proc.stderr.read()}")
        try:
            st = engine_request(control, "status")
            if pred(st):
                return st
        except Exception:  # noqa: BLE001 - the socket may not exist yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last status: "
                         f"{ {k: st.get(k) for k in ('state', 'link', 'link_drops', 'pages_received')} }")


def _ctl(control: str, *args: str) -> dict:
    r = subprocess.run(PCTOP + ["ctl", "--control", control, *args], capture_output=True, text=True,
                       timeout=20, cwd=ROOT)
    assert r.stdout, r.stderr
    return json.loads(r.stdout)


def _summary(proc: subprocess.Popen, timeout: float = 90) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=timeout)
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    assert lines and lines[-1]["type"] == "summary", err
    return lines[-1], err


def _stderr_until(proc: subprocess.Popen, text: str, timeout: float = 10) -> str:
    """The process's stderr lines up to the first holding `text` (or all it said in time)."""
    import select
    seen = ""
    deadline = time.monotonic() + timeout
    while text not in seen and time.monotonic() < deadline:
        if select.select([proc.stderr], [], [], 0.1)[0]:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
    return seen


def _blocked(st: dict) -> int:
    """vCPU faults queued in the uffds: fdinfo `total` = pending (not read yet) + read but
    not resolved. While the link is down the readers leave new faults unread (`pending`);
    faults read just before a silent drop wait as read-but-unresolved."""
    return sum(u.get("total", 0) for u in st.get("uffds", ()))


def test_three_link_drops_during_postcopy_then_verified(link, procs, tmp_path):
    """ctl drop-link, ip link down, and an nftables drop-all rule, each during post-copy,
    each recovered with `pctop ctl recover`: the run completes with nothing lost or doubled."""
    if not link.netem_available():
        print("netem missing (CONFIG_NET_SCH_NETEM off): loss via nftables, delay via the engine's latency")
    tok = _token_file(tmp_path)
    ctl = str(tmp_path / "dest.sock")
    src, address = _start_source(procs, link, tmp_path, "--bandwidth", "6M", token=tok)
    # 1 ms per demand reply (the delay netem would add) keeps demand from fetching everything early.
    dst = _start_dest(procs, link, address, ctl, "--link-timeout", "1", "--latency", "1000", token=tok)
    st = _wait(ctl, lambda s: s["state"] == "postcopy" and s["pages_received"] > 0, "post-copy", proc=dst)
    assert st["link"] == "up" and {"latency", "drop-link", "recover"} <= set(st["commands"])
    assert st["latency_us"] == 1000

    def drop(how: str) -> None:
        before = engine_request(ctl, "status")["link_drops"]
        if how == "ctl":
            assert engine_request(ctl, "drop-link") == {"type": "reply", "ok": True, "cmd": "drop-link"}
        elif how == "link-down":
            link.set_link(False)
        elif how == "nft":
            if link.nft_available():
                link.nft_drop("b", 100)
            else:  # say what stands in
                print("nft not installed (apt-get install nftables): a second ip-link drop stands in")
                link.set_link(False)
        # the link reports down first, then its callback pauses the engine (pctop/engine/run.py
        # _on_link_change): a status between the two shows link down in post-copy, so wait for both
        _wait(ctl, lambda s: s["link"] == "down" and s["link_drops"] == before + 1 and s["state"] == "paused",
              f"{how}: link down, migration paused", proc=dst)
        # vCPUs that touch a missing page stay blocked: their faults queue in the uffd.
        st = _wait(ctl, lambda s: _blocked(s) >= 1 and s["pages_missing"] > 0, f"{how}: a blocked vCPU fault queued",
                   proc=dst)
        time.sleep(0.3)  # the vCPUs stay blocked: nothing arrives while the link is down
        assert engine_request(ctl, "status")["pages_received"] == st["pages_received"]
        if how == "link-down":
            link.set_link(True)
        elif how == "nft":
            link.nft_drop("b", 0) if link.nft_available() else link.set_link(True)
        assert (_ctl(ctl, "recover") if how == "ctl" else engine_request(ctl, "recover"))["ok"]
        _wait(ctl, lambda s: s["link"] == "up" and s["recoveries"] == before + 1, f"{how}: recovered", proc=dst)

    for how in ("ctl", "link-down", "nft"):
        drop(how)
    if link.nft_available():
        # 2 % loss on the source's side for a while: TCP retransmits, nothing is lost. (A
        # retransmission backoff can outlast the 1 s heartbeat timeout: then recover again.)
        link.nft_drop("a", 2)
        time.sleep(1.5)
        link.nft_drop("a", 0)
        if engine_request(ctl, "status")["link"] != "up":
            _wait(ctl, lambda s: s["link"] == "down", "loss: link down", proc=dst)
            assert engine_request(ctl, "recover")["ok"]
    assert engine_request(ctl, "bandwidth", 0)["ok"]  # then let the stream finish
    s, err = _summary(dst)
    assert s["ok"] and s["mismatches"] == 0, (s["mismatch_list"], s["errors"], err)
    assert s["state"] == "completed" and s["link_drops"] == s["recoveries"] >= 3
    assert s["pages_verified"] == s["pages_total"] == 64 * 256
    assert s["pages_demand"] + s["pages_background"] == s["pages_total"]  # each page installed once
    assert src.wait(20) == 0


def test_killed_source_fails_the_destination_with_the_reason_within_10s(link, procs, tmp_path):
    tok = _token_file(tmp_path)
    ctl = str(tmp_path / "dest.sock")
    src, address = _start_source(procs, link, tmp_path, "--bandwidth", "1M", token=tok)
    dst = _start_dest(procs, link, address, ctl, "--auto-recover", token=tok)
    _wait(ctl, lambda s: s["state"] == "postcopy" and s["pages_received"] > 0, "post-copy", proc=dst)
    src.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    out, err = dst.communicate(timeout=15)
    took = time.monotonic() - t0
    assert dst.returncode == 1 and took < 10, (took, err)
    last = err.strip().splitlines()[-1]
    # Says why, and what the guest would have lost: pages never received, faults waiting.
    assert last.startswith("pctop engine dest: error: the source is gone:"), err
    assert "pages never arrived" in last and "faults were waiting" in last and "vCPUs stopped" in last
    assert "Traceback" not in err
    progress = [json.loads(x) for x in out.splitlines() if x.strip()]
    assert progress[-1]["type"] != "summary"  # no verified summary for a failed run


def test_wrong_token_is_refused_and_both_ends_say_why(link, procs, tmp_path):
    src, address = _start_source(procs, link, tmp_path, token=_token_file(tmp_path))
    bad = tmp_path / "bad"
    bad.write_text("not-the-token")
    r = subprocess.run(link.prefix("b") + PCTOP + ["engine", "dest", "--connect", address, "--memory", MEM,
                       "--token-file", str(bad), "--control", ""], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 1 and "wrong or missing token" in r.stderr, r.stderr
    err = _stderr_until(src, "wrong or missing token")
    assert "refused a connection" in err and "wrong or missing token" in err


def test_listening_beyond_loopback_needs_a_token():
    env = {k: v for k, v in os.environ.items() if k != "PCTOP_ENGINE_TOKEN"}
    r = subprocess.run(PCTOP + ["engine", "source", "--listen", "0.0.0.0:0"], capture_output=True, text=True,
                       timeout=30, cwd=ROOT, env=env)
    assert r.returncode == 2 and "needs a shared token" in r.stderr and "Traceback" not in r.stderr


def test_source_refuses_another_protocol_version_and_says_why(procs, tmp_path):
    src, address = _start_source(procs, None, tmp_path, "--listen", f"unix:{tmp_path / 's.sock'}")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(address[5:])
    T.recv_greeting(s)
    T.send_greeting(s, {"role": "dest", "channel": "bg", "index": 0, "channels": 1, "session": "x",
                        "epoch": 1, "npages": 64 * 256, "page_size": 4096, "config": "?"}, version=2)
    _, reply = T.recv_greeting(s)
    s.close()
    assert not reply["ok"] and "version mismatch" in reply["error"]
    err = _stderr_until(src, "version mismatch")
    assert "version mismatch" in err and "speaks version 2" in err


def test_destination_refuses_a_source_of_another_version_and_says_why(tmp_path):
    path = str(tmp_path / "fake.sock")
    lsn = socket.socket(socket.AF_UNIX)
    lsn.bind(path)
    lsn.listen(1)
    told: dict = {}

    def fake_source():
        c, _ = lsn.accept()
        T.send_greeting(c, {"role": "source", "npages": 64 * 256, "page_size": 4096, "config": "?",
                            "auth": False, "nonce": "n"}, version=3)
        told["reply"] = T.recv_greeting(c)[1]
        c.close()
    t = threading.Thread(target=fake_source, daemon=True)
    t.start()
    r = subprocess.run(PCTOP + ["engine", "dest", "--connect", f"unix:{path}", "--memory", MEM, "--control", ""],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    t.join(5)
    lsn.close()
    assert r.returncode == 1 and "version mismatch" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "speaks version 3" in told["reply"]["refuse"]


def test_auto_recover_on_loopback_after_drop_link(procs, tmp_path):
    ctl = str(tmp_path / "dest.sock")
    src, address = _start_source(procs, None, tmp_path, "--bandwidth", "2M", "--memory", "32M")
    dst = _start_dest(procs, None, address, ctl, "--auto-recover", "--memory", "32M", "--latency", "2000")
    _wait(ctl, lambda s: s["state"] == "postcopy" and s["pages_received"] > 0, "post-copy", proc=dst)
    assert engine_request(ctl, "drop-link")["ok"]
    _wait(ctl, lambda s: s["recoveries"] >= 1 and s["link"] == "up", "recovered by itself", proc=dst)
    assert engine_request(ctl, "recover") == {"type": "reply", "ok": False, "cmd": "recover", "error": "the link is up"}
    assert engine_request(ctl, "latency", 250)["ok"] and engine_request(ctl, "status")["latency_us"] == 250
    assert not engine_request(ctl, "latency", -1)["ok"]
    assert engine_request(ctl, "bandwidth", 0)["ok"]
    s, err = _summary(dst)
    assert s["ok"] and s["mismatches"] == 0 and s["link_drops"] >= 1, err
    assert src.wait(20) == 0


def test_ctl_bad_usage_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run(PCTOP + ["ctl", "--control", str(tmp_path / "none.sock"), "latency"], capture_output=True,
                       text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip() == "pctop ctl: error: latency needs a number"
    r = subprocess.run(PCTOP + ["ctl", "--control", str(tmp_path / "none.sock"), "status"], capture_output=True,
                       text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("pctop ctl: error: cannot connect") and not r.stdout


def test_source_resume_map_marks_exactly_the_missing_pages_unsent_and_rewinds_only_to_them():
    from pctop.engine.page_server import PageServer

    src = PageServer(bytearray(16 * 4096), 16, 4096, [], None)
    src.sent[:16] = b"\x01" * 12 + b"\x00" * 4  # the stream got to page 12 ...
    src._cursor = 12
    present = bytearray(16)
    present[:12] = b"\x01" * 12
    present[5] = 0  # ... but page 5 was lost in flight, and 14 arrived on demand
    present[14] = 1
    assert src.apply_resume(present) == 4  # 5, 12, 13, 15
    assert bytes(src.sent[:16]) == bytes(present)
    assert src._cursor == 5  # back to the lost page, not to 0
    present[5] = 1
    src._cursor = 13
    src.apply_resume(present)
    assert src._cursor == 12  # the first page still missing
