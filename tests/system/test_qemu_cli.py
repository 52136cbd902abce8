"""`pctop qemu CMD` steering a real QEMU post-copy migration (TCG: no root or KVM needed),
and its one-line errors."""

from __future__ import annotations

import json
import time

import pytest

from pctop.qemu import control
from pctop.qemu.launch import QemuConfig, QemuPair, free_port
from pctop.qemu.qmp import QmpConnection
from tests.conftest import need_qemu, run_pctop

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pair(request):
    need_qemu()
    p = QemuPair(QemuConfig(accel="tcg", region_size=8 << 20))
    request.addfinalizer(p.stop)
    p.start()
    # The test watches on the QMP sockets; `pctop qemu` gets the control sockets.
    src = QmpConnection(p.source.qmp_path).connect()
    dst = QmpConnection(p.destination.qmp_path).connect()
    request.addfinalizer(src.close)
    request.addfinalizer(dst.close)
    return p, src, dst


def qemu_cmd(p: QemuPair, *args: str):
    return run_pctop("qemu", "--dest", p.destination.control_path, "--source", p.source.control_path, *args)


def ok(r) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_whole_postcopy_migration_steered_by_pctop_qemu(pair):
    p, src, dst = pair
    assert "source: postcopy-ram on" in ok(qemu_cmd(p, "enable-postcopy"))
    caps = {c["capability"]: c["state"] for c in dst.execute("query-migrate-capabilities")}
    assert caps["postcopy-ram"] and caps["postcopy-blocktime"]
    # 8 MiB/s pre-copy cannot keep up with a guest rewriting 8 MiB in milliseconds, so
    # pre-copy never converges by itself; 1 MiB/s post-copy lasts seconds.
    ok(qemu_cmd(p, "bandwidth", "--precopy", "8M"))
    assert "1048576" in ok(qemu_cmd(p, "bandwidth", "1M"))
    assert src.execute("query-migrate-parameters")["max-postcopy-bandwidth"] == 1 << 20
    uri = f"tcp:127.0.0.1:{free_port()}"
    ok(qemu_cmd(p, "listen", uri))
    ok(qemu_cmd(p, "migrate", uri))
    deadline = time.monotonic() + 60
    while control.query(src).get("ram", {}).get("dirty-sync-count", 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ok(qemu_cmd(p, "start-postcopy"))
    control.wait_status(dst, ("postcopy-active",), 20)

    assert "paused" in ok(qemu_cmd(p, "pause"))
    control.wait_status(dst, ("postcopy-paused",), 10)
    control.wait_status(src, ("postcopy-paused",), 10)
    assert "recovering over tcp:127.0.0.1:" in ok(qemu_cmd(p, "recover"))
    control.wait_status(src, ("completed",), 60)
    control.wait_status(dst, ("completed",), 60)

    infos = json.loads(ok(qemu_cmd(p, "status", "--json")))
    assert infos["source"]["status"] == infos["destination"]["status"] == "completed"
    assert infos["source"]["ram"]["postcopy-requests"] > 0
    assert len(infos["destination"]["postcopy-vcpu-blocktime"]) == 1
    text = ok(qemu_cmd(p, "status"))
    assert "destination: qemu_status=completed" in text and "postcopy_vcpu_blocktime_ms=" in text


def test_qemu_refusing_a_command_is_one_line_and_exit_1(pair):
    p, _, _ = pair
    r = run_pctop("qemu", "--dest", p.destination.control_path, "listen", "bogus:uri")
    assert r.returncode == 1
    assert r.stderr.startswith("pctop qemu: error: QEMU refused:") and r.stderr.count("\n") == 1


@pytest.mark.parametrize("args, says", [
    (("pause",), "needs the destination's QMP socket (--dest SOCKET)"),
    (("start-postcopy",), "needs the source's QMP socket (--source SOCKET)"),
    (("--source", "/x", "bandwidth", "12Q"), "not a size"),
    (("teleport",), "No such command"),
])
def test_usage_errors_are_one_line_and_exit_2(args, says):
    r = run_pctop("qemu", *args)
    assert r.returncode == 2
    assert says in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
