"""The dashboard's control keys steer a real QEMU post-copy migration (TCG) through
the QMP source: b lowers max-postcopy-bandwidth, x pauses (after asking), r recovers."""

from __future__ import annotations

import pytest

from pctop.qemu import control
from pctop.qemu.launch import qemu_unavailable_reason
from pctop.qemu.migration import MIB, MigrationSettings, QemuMigration

pytestmark = pytest.mark.timeout(180)


async def until(pilot, cond, what: str, tries: int = 300) -> None:
    for _ in range(tries):
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
def postcopy(request):
    """A migration in post-copy, capped so it lasts longer than the test's key presses."""
    reason = qemu_unavailable_reason("tcg")
    if reason:
        pytest.skip(reason)
    mig = QemuMigration(MigrationSettings(accel="tcg", region_mib=16, postcopy_bandwidth=2 * MIB))
    request.addfinalizer(mig.close)
    mig.boot()
    mig.prepare()
    mig.start_precopy()
    mig.wait_precopy_pass()
    mig.switch_to_postcopy()
    return mig


async def test_tui_keys_steer_qemu(postcopy):
    from pctop.sources.qmp import attach
    from pctop.stats import open_live
    from pctop.ui.app import PctopApp
    from pctop.ui.feeds import LiveFeed

    mig = postcopy
    pair = mig.pair
    header, stats = open_live((pair.destination.pid, pair.source.pid), None, 0.25, use_ebpf=False)
    header, qmp = attach(header, stats, [pair.destination.qmp_path, pair.source.qmp_path])
    app = PctopApp(LiveFeed(header, stats.collect, interval=0.25, controls=qmp, on_close=stats.close))

    def limit() -> int:
        return mig.src.execute("query-migrate-parameters")["max-postcopy-bandwidth"]

    def dest_status() -> str:
        return control.query(mig.dst)["status"]

    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: app.sample and any(t.migration for t in app.sample.targets),
                    "a migration in the dashboard")
        await until(pilot, lambda: app.bandwidth_limit == 2 * MIB, "the limit in force learned from QEMU")
        await pilot.press("b")
        await until(pilot, lambda: limit() == 1 * MIB, "max-postcopy-bandwidth lowered")
        await pilot.press("x")
        await pilot.pause(0.2)
        await pilot.press("y")
        await until(pilot, lambda: dest_status() == "postcopy-paused", "QEMU paused")
        await until(pilot, lambda: any(t.migration and t.migration.state == "paused"
                                       for t in app.sample.targets), "the dashboard shows paused")
        await pilot.press("B", "B", "B", "B", "B", "B")  # faster again, so the run ends soon
        await pilot.press("r")
        await until(pilot, lambda: dest_status() in ("postcopy-active", "completed"), "QEMU recovered")
        await until(pilot, lambda: any(r["cmd"] == "recover" for r in app.control_log), "recover answered")
        assert all(r.get("ok") for r in app.control_log), app.control_log
        assert {"bandwidth", "drop-link", "recover"} <= {r["cmd"] for r in app.control_log}
    control.wait_status(mig.dst, ("completed",), 60)
