"""The dashboard's control keys steer a real QEMU post-copy migration (TCG) through
the QMP source: b lowers max-postcopy-bandwidth, x pauses (after asking), r recovers;
e enables post-copy on both QEMUs, P switches a pre-copy to post-copy (after asking)."""

from __future__ import annotations

import pytest

from pctop.qemu import control
from pctop.qemu.migration import MIB, MigrationSettings, QemuMigration
from tests.conftest import need_qemu

pytestmark = pytest.mark.timeout(180)


async def until(pilot, cond, what: str, tries: int = 300) -> None:
    for _ in range(tries):
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
def booted(request):
    """Two QEMUs (TCG), the guest running on the source, no migration set up yet;
    the post-copy stream capped so a migration outlasts the test's key presses."""
    need_qemu()
    mig = QemuMigration(MigrationSettings(accel="tcg", region_mib=16, postcopy_bandwidth=2 * MIB))
    request.addfinalizer(mig.close)
    mig.boot()
    return mig


@pytest.fixture
def postcopy(booted):
    """A migration in post-copy."""
    mig = booted
    mig.prepare()
    mig.start_precopy()
    mig.wait_precopy_pass()
    mig.switch_to_postcopy()
    return mig


def dashboard(mig: QemuMigration):
    """The App watching both QEMUs through the QMP source (destination, then source), as
    `pctop monitor --qmp DEST --qmp SRC --no-ebpf` would, with the QMP controls attached."""
    from pctop.root import open_live
    from pctop.sources.qmp import attach
    from pctop.ui.app import PctopApp
    from pctop.ui.feeds import LiveFeed

    pair = mig.pair
    header, stats = open_live((pair.destination.pid, pair.source.pid), None, use_ebpf=False)
    header, qmp = attach(header, stats, [pair.destination.qmp_path, pair.source.qmp_path])
    return PctopApp(LiveFeed(header, stats.collect, interval=0.25, controls=qmp, on_close=stats.close))


async def test_tui_keys_steer_qemu(postcopy):
    mig = postcopy
    app = dashboard(mig)

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


def capabilities(conn) -> dict[str, bool]:
    return {c["capability"]: c["state"] for c in conn.execute("query-migrate-capabilities")}


async def test_tui_enables_and_starts_postcopy_on_qemu(booted):
    from pctop.ui.screens.confirm import ConfirmScreen

    mig = booted
    app = dashboard(mig)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.sample and any(t.migration for t in app.sample.targets),
                    "both QEMUs in the dashboard")
        # QEMU cannot pause only the background stream, nor inject latency: no keys for those.
        assert app.check_action("enable_postcopy", ()) and app.check_action("start_postcopy", ())
        assert not app.check_action("stream", ()) and not app.check_action("latency", ())
        # ... and they are offered in the help screen and the command palette.
        shown = {r.keys for r in app.key_help() if r.available}
        assert {"e", "P"} <= shown and not {"p", "l"} & shown
        from pctop.ui.widgets.keybar import KeyBar  # ... in the footer too, whole at 80 columns
        await pilot.pause()
        lines = app.query_one(KeyBar).render().plain.split("\n")
        assert all(len(line) <= 80 for line in lines)
        assert {"e Postcopy on", "P Go postcopy", "x Drop link", "r Recover"} <= {
            e.strip() for line in lines for e in line.split("  ")}
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {t for t in titles if t.startswith("QEMU:")} == {
            "QEMU: enable post-copy at both ends (postcopy-ram, postcopy-blocktime)",
            "QEMU: switch the running migration to post-copy (one-way, asks first)"}
        assert not capabilities(mig.dst)["postcopy-ram"]
        await pilot.press("e")
        await until(pilot, lambda: any(r["cmd"] == "enable-postcopy" for r in app.control_log), "enable answered")
        assert app.control_log[-1]["ok"], app.control_log
        dst, src = capabilities(mig.dst), capabilities(mig.src)
        assert dst["postcopy-ram"] and dst["postcopy-blocktime"] and src["postcopy-ram"]

        mig.prepare()  # bandwidths, 1 ms downtime limit (pre-copy never converges), listen
        mig.start_precopy()
        mig.wait_precopy_pass()
        # The switch is one-way: P asks first, and "n" leaves QEMU in pre-copy.
        await pilot.press("P")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("n")
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "confirmation closed")
        await pilot.pause(0.5)
        assert control.query(mig.src)["status"] == "active"
        assert not any(r["cmd"] == "start-postcopy" for r in app.control_log)
        await pilot.press("P")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation again")
        await pilot.press("y")
        info = control.wait_status(mig.dst, ("postcopy-active", "completed"), 30)
        assert info["status"] in ("postcopy-active", "completed")
        await until(pilot, lambda: any(r["cmd"] == "start-postcopy" for r in app.control_log), "start answered")
        assert all(r.get("ok") for r in app.control_log), app.control_log
        await until(pilot, lambda: any(t.migration and t.migration.state in ("postcopy", "completed")
                                       for t in app.sample.targets), "the dashboard shows post-copy")
        mig.src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 0})  # finish soon
    control.wait_status(mig.dst, ("completed",), 60)
    assert control.query(mig.src).get("ram", {}).get("postcopy-bytes", 0) > 0  # post-copy moved pages
