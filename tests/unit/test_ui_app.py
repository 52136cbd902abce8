"""Pilot tests: every view and replay key, and the command palette, driven on
the real App with its real worker thread, over a ReplayFeed or a LiveFeed of
synthetic Samples (the engine-control keys are tested against a real engine
in test_ui_engine.py)."""

from __future__ import annotations

import pytest

from pctop.ui.app import PctopApp
from pctop.ui.feeds import LiveFeed, ReplayFeed
from pctop.ui.screens.confirm import ConfirmScreen
from pctop.ui.screens.detail import VcpuDetailScreen
from pctop.ui.screens.help import HelpScreen
from pctop.ui.synthetic import synthetic_sample
from pctop.ui.widgets.event_log import EventLog
from pctop.ui.widgets.latency import LatencyHistogram
from pctop.ui.widgets.vcpu_table import COLUMNS, VcpuTable, fmt_ms
from tests.helpers.headers import LIVE

VCPUS = 6


async def until(pilot, cond, what: str, tries: int = 200) -> None:
    """Let the App (and its worker) run until cond() holds; bounded, not timed."""
    for _ in range(tries):
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"never happened: {what}")


def replay_app(position: int = 10) -> PctopApp:
    samples = [synthetic_sample(seq=i, vcpus=VCPUS) for i in range(1, 41)]
    return PctopApp(ReplayFeed(LIVE, samples, paused=True, position=position))


def live_app() -> tuple[PctopApp, list]:
    made: list = []

    def collect():
        made.append(synthetic_sample(seq=len(made) + 1, vcpus=VCPUS))
        return made[-1]

    return PctopApp(LiveFeed(LIVE, collect, interval=0.05)), made


def table_rows(app: PctopApp) -> list[tuple[int, int]]:
    return list(app.query_one(VcpuTable)._keys)


async def test_replay_shows_a_row_per_vcpu_and_steps_and_seeks():
    app = replay_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        assert app.sample.seq == 11
        assert len(table_rows(app)) == VCPUS
        assert app.history.samples == 11  # history rebuilt from the recording up to here
        await pilot.press("n")
        await until(pilot, lambda: app.sample.seq == 12, "step")
        await pilot.press("right_square_bracket")
        await until(pilot, lambda: app.sample.seq == 22, "seek +10 s")
        await pilot.press("left_square_bracket")
        await until(pilot, lambda: app.sample.seq == 12, "seek -10 s")
        await pilot.press("space")
        assert not app.feed.paused
        await pilot.press("space")
        assert app.feed.paused
        speed = app.feed.speed
        await pilot.press("plus")
        assert app.feed.speed > speed
        await pilot.press("minus", "minus")
        assert app.feed.speed < speed
        # Replay has no engine: its keys are hidden and do nothing.
        assert app.check_action("stream", ()) is False
        await pilot.press("p", "x")
        assert not isinstance(app.screen, ConfirmScreen)


async def test_sort_keys_reorder_rows():
    app = replay_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        table = app.query_one(VcpuTable)
        assert table_rows(app) == sorted(table_rows(app))  # by vCPU index
        await pilot.press("s")
        assert table.sort_key == "faults"
        rates = {(app.sample.targets[0].pid, v.tid): v.faults_per_s for v in app.sample.targets[0].vcpus}
        shown = [rates[k] for k in table_rows(app)]
        assert shown == sorted(shown, reverse=True)
        await pilot.press("S")
        shown = [rates[k] for k in table_rows(app)]
        assert shown == sorted(shown)
        await pilot.press("s")
        assert table.sort_key == "stall"


async def test_enter_opens_the_selected_vcpu_detail_and_escape_returns():
    app = replay_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        await pilot.press("down", "down")
        want = app.query_one(VcpuTable).selected_key
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, VcpuDetailScreen), "detail screen")
        assert app.screen.key == want
        hist = app.screen.query_one(LatencyHistogram)
        await until(pilot, lambda: bool(hist._args), "detail histogram drawn")
        assert "since watching" in hist._args[1]
        await pilot.press("c")
        assert "last interval" in hist._args[1]
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, VcpuDetailScreen), "back")


async def test_histogram_scope_and_span_keys():
    app = replay_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        hist = app.query_one("#hist", LatencyHistogram)
        assert hist._args[1] == "all vCPUs, last interval"
        await pilot.press("down", "h")
        assert hist._args[1].startswith("vCPU 1 of ")
        await pilot.press("c")
        assert hist._args[1].endswith("since watching")
        await pilot.press("h")
        assert hist._args[1] == "all vCPUs, since watching"


async def test_help_lists_every_key_and_closes():
    app = replay_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        keys = {r.keys for r in app.screen.rows}
        for b in app.BINDINGS:
            assert (b.key_display or b.key) in keys
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen), "help closed")
        await pilot.press("q")
    assert app.return_code == 0


async def test_live_freeze_keeps_the_display_while_collection_goes_on():
    app, made = live_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        assert len(table_rows(app)) == VCPUS
        await pilot.press("space")
        frozen_seq = app.query_one(VcpuTable)._last[0].seq
        n = len(made)
        await until(pilot, lambda: len(made) > n + 2, "collection continues while frozen")
        assert app.query_one(VcpuTable)._last[0].seq == frozen_seq
        assert app.sample.seq > frozen_seq
        await pilot.press("space")
        assert app.query_one(VcpuTable)._last[0].seq == app.sample.seq
        interval = app.feed.interval
        await pilot.press("minus", "minus")  # slower: a longer interval
        assert app.feed.interval > interval
        slow = app.feed.interval
        await pilot.press("plus")
        assert app.feed.interval < slow
        # Live has no playback: n / [ ] are hidden.
        assert app.check_action("step", ()) is False


async def test_events_from_samples_reach_the_log_with_their_time():
    from pctop.model import Event

    samples = [synthetic_sample(seq=i, events=(Event(1.7e9 + i, "state", f"s{i}"),)) for i in range(1, 6)]
    app = PctopApp(ReplayFeed(LIVE, samples, paused=True, position=4))
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        log = app.query_one(EventLog)
        assert log.count == 5  # the four before the start position, rebuilt, and this one
        await pilot.press("left_square_bracket")
        await until(pilot, lambda: app.sample.seq == 1, "seek to start")
        assert log.count == 5 + 1  # cleared and rebuilt: only the first sample's event


PALETTE = {
    "Sort by the next column": lambda app: app.query_one(VcpuTable).sort_key == "faults",
    "Reverse the sort order": lambda app: app.query_one(VcpuTable).sort_reverse is True,
    "Open the selected vCPU's detail": lambda app: isinstance(app.screen, VcpuDetailScreen),
    "Histogram: all vCPUs / the selected one": lambda app: app.hist_selected,
    "Histogram: last interval / since watching": lambda app: app.hist_cumulative,
    "Freeze the display (replay: pause playback)": lambda app: app.feed.paused is False,
    "Faster refresh": lambda app: app.feed.speed == 2.0,
    "Slower refresh": lambda app: app.feed.speed == 0.5,
    "Replay: step one sample": lambda app: app.sample.seq == 12,
    "Replay: seek forward 10 s": lambda app: app.sample.seq == 21,
    "Replay: seek back 10 s": lambda app: app.sample.seq == 1,
}


async def test_palette_offers_every_view_and_replay_action():
    from pctop.ui.app import KEYS

    app = replay_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        offered = {c.title for c in app.get_system_commands(app.screen)}
    expected = {title for section, _, title in KEYS if section in ("View", "Replay")}
    expected -= {"Quit pctop", "Show all keys"}  # the palette has its own Quit and Keys
    assert expected <= offered
    assert set(PALETTE) == expected
    assert not any(t.startswith(("Migration:", "QEMU:")) for t in offered)  # no engine attached


@pytest.mark.parametrize("title", sorted(PALETTE))
async def test_palette_action_has_its_effect(title):
    app = replay_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        await pilot.press("ctrl+p")
        await pilot.pause(0.1)
        await pilot.press(*title)
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: PALETTE[title](app), f"palette {title!r}")


async def test_table_mouse_and_paging():
    samples = [synthetic_sample(seq=i, vcpus=64) for i in range(1, 4)]
    app = PctopApp(ReplayFeed(LIVE, samples, paused=True, position=2))
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        table = app.query_one(VcpuTable)
        await pilot.press("end")
        await pilot.pause()
        assert table.cursor_row == 63 and table.scroll_offset.y > 0  # scrolled to keep it visible
        await pilot.press("home", "pagedown")
        assert table.cursor_row > 1
        await pilot.press("home")
        # A click on the "faults/s" header sorts by it; a second click reverses.
        x = sum(c.width + 1 for c in COLUMNS[:2]) + 2
        await pilot.click(VcpuTable, offset=(x, 0))
        assert table.sort_key == "faults" and table.sort_reverse
        await pilot.click(VcpuTable, offset=(x, 0))
        assert table.sort_key == "faults" and not table.sort_reverse
        # Click a row to select it, click it again to open its detail.
        await pilot.click(VcpuTable, offset=(3, 3))
        assert table.cursor_row == 2
        want = table.selected_key
        await pilot.click(VcpuTable, offset=(3, 3))
        await until(pilot, lambda: isinstance(app.screen, VcpuDetailScreen), "detail by click")
        assert app.screen.key == want


async def test_confirm_screen_answers():
    app = replay_app()
    answers: list = []
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        for key, want in (("n", False), ("escape", False), ("y", True)):
            app.push_screen(ConfirmScreen("Drop the link?"), answers.append)
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "confirm shown")
            await pilot.press(key)
            await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "confirm closed")
            assert answers[-1] is want
        # The safe answer has the focus: Enter says no.
        app.push_screen(ConfirmScreen("Drop the link?"), answers.append)
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "confirm shown")
        await pilot.press("enter")
        await until(pilot, lambda: len(answers) == 4, "answered")
        assert answers[-1] is False


async def test_a_failing_collection_is_logged_and_the_dashboard_goes_on():
    calls: list = []

    def collect():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("procfs went away")
        return synthetic_sample(seq=len(calls))

    app = PctopApp(LiveFeed(LIVE, collect, interval=0.05))
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.sample is not None and app.sample.seq >= 4, "samples after the error")
        log = app.query_one(EventLog)
        assert any("procfs went away" in line.text for line in log.lines)


def table_text(app: PctopApp) -> list[str]:
    table = app.query_one(VcpuTable)
    return [table.render_line(y).text for y in range(table.size.height)]


@pytest.mark.parametrize("size", [(80, 24), (120, 36)])
async def test_qemu_blocktime_beside_the_measured_stall_in_table_and_detail(size):
    """A VMM's own blocktime (QEMU's, from QMP) gets a column next to pctop's stall,
    at 80 columns too, and a line in the vCPU detail; synthetic Samples carry it."""
    samples = [synthetic_sample(seq=i, vcpus=VCPUS, vmm=True) for i in range(1, 6)]
    app = PctopApp(ReplayFeed(LIVE, samples, paused=True, position=4))
    async with app.run_test(size=size) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        await pilot.pause()
        lines = table_text(app)
        head = lines[0]
        assert head.index("stalled") < head.index("qemu blk") < head.index("p99")
        v1 = app.sample.targets[0].vcpus[1]
        row = next(line for line in lines[1:] if line.split()[:2] == [str(app.sample.targets[0].pid), "1"])
        # QEMU's total since watching (samples 1-5), beside this interval's stall share.
        row_total = sum(s.targets[0].vcpus[1].vmm_blocktime_ms for s in samples[:5])
        assert fmt_ms(row_total) in row and f"{v1.stalled_frac * 100:.1f}%" in row
        assert len(head.rstrip()) <= size[0]
        await pilot.press("down", "enter")
        await until(pilot, lambda: isinstance(app.screen, VcpuDetailScreen), "detail screen")
        summary = app.screen.query_one("#detail-summary")
        await until(pilot, lambda: "QEMU blocktime" in str(summary._args[0]), "blocktime in the detail")
        text = str(summary._args[0])
        assert fmt_ms(v1.vmm_blocktime_ms) in text
        # Totals since watching, both sides (samples 1-5 are in the history).
        vmm_total = sum(s.targets[0].vcpus[1].vmm_blocktime_ms for s in samples[:5])
        stall_total = sum(s.targets[0].vcpus[1].stall_ns for s in samples[:5])
        assert f"(total {fmt_ms(vmm_total)})" in text and f"(total {fmt_ms(stall_total / 1e6)})" in text


async def test_qemu_column_stays_with_its_total_after_qemu_stops_reporting():
    # QEMU 7.2 reports blocktime once, at completion: the next intervals carry none.
    samples = [synthetic_sample(seq=i, vcpus=VCPUS, vmm=(i == 2)) for i in range(1, 5)]
    app = PctopApp(ReplayFeed(LIVE, samples, paused=True, position=0))
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        for _ in range(3):
            await pilot.press("n")
        await until(pilot, lambda: app.sample.seq == 4, "the last sample")
        await pilot.pause()
        lines = table_text(app)
        assert "qemu blk" in lines[0]
        row = next(line for line in lines[1:] if line.split()[:2] == [str(samples[0].targets[0].pid), "1"])
        assert fmt_ms(samples[1].targets[0].vcpus[1].vmm_blocktime_ms) in row


async def test_sort_direction_shows_on_every_column():
    from pctop.ui.widgets.vcpu_table import COLUMNS, sort_label

    for c in COLUMNS:
        if c.width:
            for rev, arrow in ((False, "▲"), (True, "▼")):
                text = sort_label(c.label, c.width, rev)
                assert len(text) <= c.width and text.endswith(arrow), (c.label, text)
    app = replay_app()
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        await pilot.press("s", "s")  # vCPU -> faults/s -> stalled
        await pilot.pause()
        arrow = "▼" if app.query_one(VcpuTable).sort_reverse else "▲"
        assert f"stalled{arrow}" in table_text(app)[0]
        await pilot.press("S")
        await pilot.pause()
        assert f"stalled{'▲' if arrow == '▼' else '▼'}" in table_text(app)[0]


async def test_no_qemu_column_without_a_vmm_blocktime():
    app = replay_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        await pilot.pause()
        head = table_text(app)[0]
        assert "qemu blk" not in head and "uexit/s" in head


async def test_key_bar_shows_every_key_at_80_columns_and_a_click_presses_it():
    from pctop.ui.widgets.keybar import KeyBar

    app = replay_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        await pilot.pause()
        bar = app.query_one(KeyBar)
        lines = bar.render().plain.split("\n")
        assert bar.size.height == len(lines) >= 2 and all(len(line) <= 80 for line in lines)
        text = " ".join(lines)
        for b in app.BINDINGS:  # every key that acts in a replay is on screen (ctrl+c: in help)
            if b.show and app.check_action(b.action.split("(")[0], ()):
                assert (b.key_display or b.key) in text, b
        assert "Drop link" not in text  # no engine: its keys are not offered
        row, x = next((r, line.index("? Help")) for r, line in enumerate(lines) if "? Help" in line)
        await pilot.click(KeyBar, offset=(x, row))
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "help by click")
        await pilot.press("escape", "enter")
        await until(pilot, lambda: isinstance(app.screen, VcpuDetailScreen), "detail")
        await pilot.pause()
        # Over the detail the dashboard's table keys are not offered (nor do they act).
        shown = {k for e in app.screen.query_one(KeyBar).current() for k, _ in e.keys}
        assert "escape" in shown and not {"s", "h", "enter"} & shown


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_help_says_when_its_legend_is_cut_off_and_scrolls_to_it(size):
    from pctop.ui.screens.help import HelpBox

    app = replay_app()
    async with app.run_test(size=size) as pilot:
        await until(pilot, lambda: app.sample is not None, "first sample")
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        box = app.screen.query_one(HelpBox)
        await until(pilot, lambda: box.max_scroll_y > 0, "the help is taller than its box here")
        await until(pilot, lambda: "more below" in str(box.border_subtitle), "the hint")
        await pilot.press("end")
        await until(pilot, lambda: box.scroll_y >= box.max_scroll_y, "scrolled to the end")
        await until(pilot, lambda: not box.border_subtitle, "no hint at the end")
