"""The dashboard on a real reference-engine run: a row per vCPU, and the
engine keys change the engine's own state (asked of the engine directly)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pctop.root import stop_child
from pctop.sources.engine import EngineConnection
from tests.conftest import ROOT, need_uffd
from tests.unit.test_ui_app import until

ENGINE_RUN = """
import sys
from pctop import exits
from pctop.engine.run import Engine, EngineConfig
from pctop.engine.workload import ThreadWorkload
exits.raise_on_termination()  # as the pctop command does: SIGTERM runs the engine's cleanup
# Threads, not KVM, and 1 GiB: demand faults alone pull ~10k pages/s, a KVM guest more;
# this test needs a migration that lasts while it presses keys (hotset: cold pages come slowly).
cfg = EngineConfig(memory=1 << 30, vcpus=2, strategy="uffd", bandwidth=2 << 20, pattern="hotset",
                   control=sys.argv[1], duration=60)
Engine(cfg, ThreadWorkload).run()
"""
MiB = 1 << 20


@pytest.fixture
def engine(tmp_path):
    need_uffd()
    path = str(tmp_path / "engine.sock")
    proc = subprocess.Popen([sys.executable, "-c", ENGINE_RUN, path], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if not os.path.exists(path):
            pytest.fail(f"engine did not start: {proc.stderr.read() if proc.poll() is not None else 'no socket'}")
        yield proc, path
    finally:
        stop_child(proc)  # SIGTERM first: a killed engine cannot remove its folder


async def test_engine_keys_drive_the_real_engine(engine):
    from pctop.root import Tap, engine_controls, open_live
    from pctop.ui.app import PctopApp
    from pctop.ui.feeds import LiveFeed
    from pctop.ui.widgets.vcpu_table import VcpuTable

    proc, path = engine
    header, stats = open_live([proc.pid], None, use_ebpf=False, engine_sockets=[path])
    controls = engine_controls(stats)
    assert controls is not None
    assert engine_controls(Tap(stats, lambda sample: None)) is controls  # `monitor --export` wraps it
    app = PctopApp(LiveFeed(header, stats.collect, interval=0.25, controls=controls,
                            on_close=stats.close))
    probe = EngineConnection(path)

    def status() -> dict:
        return probe.request({"cmd": "status"})

    try:
        async with app.run_test(size=(120, 36)) as pilot:
            table = app.query_one(VcpuTable)
            await until(pilot, lambda: len(table._keys) == 2, "a row per engine vCPU")
            assert {k[0] for k in table._keys} == {proc.pid}
            assert app.check_action("stream", ()) is True
            # This engine lists latency, drop-link and recover: their keys are offered.
            assert {"latency", "drop-link", "recover"} <= set(status()["commands"])
            for action in ("latency", "drop_link", "recover"):
                assert app.check_action(action, ()) is True

            await pilot.press("p")
            await until(pilot, lambda: status()["background"] == "paused", "engine stream paused")
            assert status()["state"] == "postcopy"  # only the stream pauses; not the link
            await until(pilot, lambda: app.sample.targets[0].migration.extra["background"] == "paused",
                        "the dashboard sees the pause")
            await pilot.pause()
            header = app.query_one("#header").render().plain
            assert "POSTCOPY" in header and "stream PAUSED" in header and "link down" not in header
            await pilot.press("p")
            await until(pilot, lambda: status()["background"] == "running", "engine stream resumed")

            await pilot.press("b")
            await until(pilot, lambda: status()["bandwidth_limit_bps"] == 1 * MiB, "bandwidth halved")
            await pilot.press("B", "B")
            await until(pilot, lambda: status()["bandwidth_limit_bps"] == 4 * MiB, "bandwidth raised")
            # The command palette offers the same control and it works the same.
            title = "Migration: pause / resume the background stream"
            assert title in {c.title for c in app.get_system_commands(app.screen)}
            await pilot.press("ctrl+p")
            await pilot.pause(0.1)
            await pilot.press(*title)
            await pilot.pause(0.3)
            await pilot.press("enter")
            await until(pilot, lambda: status()["background"] == "paused", "paused from the palette")
            assert all(r.get("ok") for r in app.control_log), app.control_log
            app.send_control("resume")  # so the link states below are not masked by a pause
            await until(pilot, lambda: status()["background"] == "running", "engine stream resumed")
            # Injected latency: each l steps it (microseconds, as the engine takes it).
            await pilot.press("l")
            await until(pilot, lambda: status()["latency_us"] == 1000, "1 ms injected")
            await pilot.press("l")
            await until(pilot, lambda: status()["latency_us"] == 5000, "5 ms injected")
            # Drop the link (asks first; n keeps it), then recover it.
            await pilot.press("x")
            await pilot.press("n")
            await pilot.pause(0.3)
            assert status()["link"] == "up"
            await pilot.press("x")
            await pilot.press("y")
            await until(pilot, lambda: status()["link"] != "up", "link dropped")
            await until(pilot, lambda: app.sample.targets[0].migration.state in ("paused", "recovering"),
                        "the dashboard sees the link down")
            if app.sample.targets[0].migration.extra.get("link") == "down":
                await pilot.pause()
                assert "link down" in app.query_one("#header").render().plain
            await pilot.press("r")
            await until(pilot, lambda: status()["link"] == "up" and status()["state"] == "postcopy",
                        "link recovered")
            assert all(r.get("ok") for r in app.control_log), app.control_log
            # A command this engine does not have: its refusal is logged and the key hidden.
            sent = len(app.control_log)
            app.send_control("enable-postcopy")
            await until(pilot, lambda: len(app.control_log) == sent + 1, "the engine's answer")
            assert app.control_log[-1]["ok"] is False and "enable-postcopy" in app.refused
            assert app.check_action("enable_postcopy", ()) is False
            # Degraded tier (no eBPF asked for) is said on screen.
            assert "DEGRADED" in app.query_one("#header").render().plain
    finally:
        probe.close()
