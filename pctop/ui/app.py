"""The pctop dashboard: a Textual App over a feed.

The App is a thin shell: one `@work(thread=True)` worker pulls Samples from
the feed (which may block on the kernel, /proc or a socket) and hands each
to the UI thread with `call_from_thread`; engine control commands run in
their own short thread workers. The UI thread only renders immutable
Samples and the History it derives from them.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any, Iterable

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.worker import get_current_worker

from pctop import exits
from pctop.controls import BASE_COMMANDS, Command
from pctop.hist import EMPTY, merge_counts
from pctop.model import Event, MigrationState, Sample, StallParts
from pctop.ui.feeds import INTERVAL_STEPS, SPEED_STEPS, Controls, LiveFeed, ReplayFeed, step_in
from pctop.ui.history import HISTORY_LEN, History, state_events
from pctop.ui.screens.confirm import ConfirmScreen
from pctop.ui.screens.detail import VcpuDetailScreen, find_vcpu
from pctop.ui.screens.help import HelpScreen, KeyHelp
from pctop.ui.widgets.event_log import EventLog
from pctop.ui.widgets.header import HeaderBar
from pctop.ui.widgets.keybar import KeyBar
from pctop.ui.widgets.latency import LatencyHistogram, StallBreakdown
from pctop.ui.widgets.render import fmt_bytes, fmt_us
from pctop.ui.widgets.timeline import Timeline
from pctop.ui.widgets.uffd_panel import UffdPanel
from pctop.ui.widgets.vcpu_table import VcpuTable

MIB = 1 << 20
# Bandwidth limits offered by b/B, bytes/s; above the top step is "unlimited" (0).
BANDWIDTH_STEPS = tuple(MIB * (1 << i) for i in range(0, 11))  # 1 MiB/s .. 1 GiB/s
# Injected per-request latency offered by l, microseconds.
LATENCY_STEPS_US = (0, 1000, 5000, 20000)
# Beyond the commands every engine takes (pctop.controls.BASE_COMMANDS; the controls'
# supports() is asked about them too: QEMU has no pause of the background stream), the
# others appear only when the engine lists them or supports() says yes.
EXTRA_COMMANDS = (Command.LATENCY, Command.DROP_LINK, Command.RECOVER, Command.ENABLE_POSTCOPY,
                  Command.START_POSTCOPY)

# Trailing spaces: the footer draws a group label flush against the next key.
RATE = Binding.Group("rate ")
SORT = Binding.Group("sort ")
BW = Binding.Group("bw ")
SEEK = Binding.Group("seek ")

# (section, binding, palette title); the help screen and the palette are built from this.
KEYS: tuple[tuple[str, Binding, str], ...] = (
    ("View", Binding("q", "quit", "Quit"), "Quit pctop"),
    ("View", Binding("question_mark", "help", "Help", key_display="?"), "Show all keys"),
    ("View", Binding("space", "freeze", "Freeze", key_display="␣"), "Freeze the display (replay: pause playback)"),
    ("View", Binding("minus", "rate(False)", "slower", key_display="-", group=RATE), "Slower refresh"),
    ("View", Binding("plus", "rate(True)", "faster", key_display="+", group=RATE), "Faster refresh"),
    ("View", Binding("s", "sort", "next column", group=SORT), "Sort by the next column"),
    ("View", Binding("S", "reverse_sort", "reverse", group=SORT), "Reverse the sort order"),
    ("View", Binding("enter", "detail", "Detail", key_display="⏎"), "Open the selected vCPU's detail"),
    ("View", Binding("h", "hist_scope", "Scope"), "Histogram: all vCPUs / the selected one"),
    ("View", Binding("c", "hist_span", "Span"), "Histogram: last interval / since watching"),
    ("Replay", Binding("n", "step", "Step"), "Replay: step one sample"),
    ("Replay", Binding("left_square_bracket", "seek(-10)", "-10s", key_display="[", group=SEEK),
     "Replay: seek back 10 s"),
    ("Replay", Binding("right_square_bracket", "seek(10)", "+10s", key_display="]", group=SEEK),
     "Replay: seek forward 10 s"),
    ("Migration", Binding("p", "stream", "Stream"), "Migration: pause / resume the background stream"),
    ("Migration", Binding("b", "bandwidth(False)", "bw-", group=BW), "Migration: lower the bandwidth limit"),
    ("Migration", Binding("B", "bandwidth(True)", "bw+", group=BW), "Migration: raise the bandwidth limit"),
    ("Migration", Binding("l", "latency", "Latency"), "Migration: cycle the injected latency"),
    ("Migration", Binding("x", "drop_link", "Drop link"), "Migration: drop the link (asks first)"),
    ("Migration", Binding("r", "recover", "Recover"), "Migration: recover the link"),
    ("QEMU", Binding("e", "enable_postcopy", "Postcopy on"),
     "QEMU: enable post-copy at both ends (postcopy-ram, postcopy-blocktime)"),
    ("QEMU", Binding("P", "start_postcopy", "Go postcopy"),
     "QEMU: switch the running migration to post-copy (one-way, asks first)"),
)

# Key action -> the control command it sends (engine or QMP, pctop.sources.qmp).
# Actions on the dashboard's table and panels: not offered over the detail screen.
DASHBOARD_ACTIONS = {"sort", "reverse_sort", "detail", "hist_scope", "hist_span"}
ENGINE_ACTIONS = {"stream": Command.PAUSE, "bandwidth": Command.BANDWIDTH, "latency": Command.LATENCY,
                  "drop_link": Command.DROP_LINK, "recover": Command.RECOVER,
                  "enable_postcopy": Command.ENABLE_POSTCOPY, "start_postcopy": Command.START_POSTCOPY}
# Why a key is greyed out in the help screen, by section.
UNAVAILABLE = {"Replay": "replay only", "Migration": "no engine or QEMU attached, or it lacks this",
               "QEMU": "QEMU attached with --qmp only"}
REPLAY_ACTIONS = {"step", "seek"}


class PctopApp(App[None]):
    CSS_PATH = "pctop.tcss"
    TITLE = "pctop"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (140, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (44, "-tall")]
    # Ctrl+C quits, as in htop, bpftop and kvm_stat (Textual only hints at ctrl+q);
    # like Ctrl+C in a shell it counts as an interruption (exit status 130).
    BINDINGS = [k[1] for k in KEYS] + [Binding("ctrl+c", "interrupt", "Quit", show=False, priority=True)]

    def __init__(self, feed: LiveFeed | ReplayFeed, *, interval: float | None = None) -> None:
        super().__init__()
        self.feed = feed
        self.header_info = feed.header
        # The two modes, as types: live (with the controls of what it watches) or playback.
        self.live: LiveFeed | None = feed if isinstance(feed, LiveFeed) else None
        self.playback: ReplayFeed | None = feed if isinstance(feed, ReplayFeed) else None
        self.controls: Controls | None = self.live.controls if self.live else None
        self.is_replay = self.playback is not None
        self.interval = interval or (self.live.interval if self.live else 1.0)
        self.history = History()
        self.sample: Sample | None = None
        self.displayed: Sample | None = None  # the Sample on screen (older than .sample while frozen)
        self.frozen = False
        self.hist_selected = False
        self.hist_cumulative = False
        self.supported: dict[Command, bool] = {c: True for c in BASE_COMMANDS}
        self.bandwidth_limit: float | None = None
        self.latency_us = 0
        self._had_migration = False
        self.refused: set[Command] = set()  # commands the engine answered "unknown" to
        self.control_log: list[dict] = []  # replies, newest last (tests read it)
        self.ended_by: int | None = None  # the signal that ended the app (Ctrl+C counts as SIGINT)

    # -- layout ------------------------------------------------------------
    def compose(self) -> ComposeResult:
        # One flow, two layouts (pctop.tcss): narrow stacks table, panels, log;
        # wide docks the panels on the right and gives the log what the table leaves.
        yield HeaderBar(id="header")
        with Vertical(id="body"):
            with Horizontal(id="side"):
                with Vertical(id="side-a"):
                    yield UffdPanel(id="uffd", classes="panel")
                    yield StallBreakdown(id="parts", classes="panel")
                yield LatencyHistogram(id="hist", classes="panel")
            yield VcpuTable(id="vcpus", classes="panel")
            yield Timeline(id="timeline", classes="panel")
            yield EventLog(id="events", classes="panel")
        yield KeyBar()

    def on_mount(self) -> None:
        self.query_one("#vcpus").border_title = "vCPUs"
        self.query_one("#uffd").border_title = "userfaultfd queue"
        self.query_one("#parts").border_title = "where stall time went"
        self.query_one("#hist").border_title = "stall latency"
        self.query_one("#events").border_title = "events"
        self.query_one("#timeline").border_title = "timeline"
        self.query_one(VcpuTable).focus()
        self._render_header()
        self._catch_termination()
        self._pump()

    def _catch_termination(self) -> None:
        """SIGTERM and SIGHUP (a closed terminal) end the app like `q`, so whoever runs it
        can clean up (pctop.ui.run_feed re-raises them as pctop.exits.Interrupted)."""
        if self.is_headless or threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()

        def handler(signum: int, _frame) -> None:
            if signum == signal.SIGHUP:
                exits.detach_terminal()
            loop.call_soon_threadsafe(self._end, signum)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, handler)

    def _end(self, signum: int) -> None:
        self.ended_by = signum
        self.exit()

    def action_interrupt(self) -> None:
        self._end(signal.SIGINT)

    def on_unmount(self) -> None:
        self.feed.close()

    # -- the worker --------------------------------------------------------
    @work(thread=True, exclusive=True, group="feed", exit_on_error=False)
    def _pump(self) -> None:
        worker = get_current_worker()
        while not worker.is_cancelled:
            try:
                s = self.feed.next_sample()
            except Exception as e:  # a source error must reach the screen, not kill the UI
                self._post(self._log_event, Event(time.time(), "error", f"collection failed: {e}"))
                time.sleep(self.interval)
                continue
            if worker.is_cancelled:
                return
            if s is None:
                self._post(self._render_header)  # replay status may have changed
            else:
                self._post(self.apply_sample, s)

    def _post(self, fn, *args) -> None:
        try:
            self.call_from_thread(fn, *args)
        except RuntimeError:
            pass  # the app is shutting down

    # -- samples -----------------------------------------------------------
    def apply_sample(self, s: Sample) -> None:
        h = self.history
        prev = self.sample
        fresh = h.last_seq is None or s.seq != h.last_seq + 1
        if fresh and self.playback is not None:
            # After a seek (or at the start of a replay) rebuild the history and
            # the event log from the recording, so sparklines stay truthful.
            h.clear()
            self.query_one(EventLog).clear()
            prev = None
            for earlier in self.playback.window(HISTORY_LEN)[:-1]:
                self._take(prev, earlier)
                prev = earlier
        self._take(prev, s)
        self.sample = s
        self._learn_controls(s)
        if not self.frozen:
            self.render_all()

    def _take(self, prev: Sample | None, s: Sample) -> None:
        self.history.add(s)
        for e in (*s.events, *state_events(prev, s)):
            self._log_event(e)

    def render_all(self) -> None:
        s = self.sample
        self._render_header()
        if s is None:
            return
        self.displayed = s
        self.query_one(VcpuTable).show(s, self.history)
        self.query_one(UffdPanel).show(s, self.history)
        self.query_one(Timeline).show(self.history)
        self._render_latency()
        screen = self.screen
        if isinstance(screen, VcpuDetailScreen):
            screen.show_sample(s, self.history)

    def _status(self) -> str:
        f = self.playback
        if f is not None:
            where = f"{f.position + 1}/{len(f.samples)}"
            if f.finished:
                return f"■ end of recording {where}"
            if f.paused:
                return f"❚❚ replay paused {where}"
            return f"▶ replay {f.speed:g}x {where}"
        ended = self.live.ended if self.live else None
        if ended:
            return f"■ {ended}"
        if self.frozen:
            return "❚❚ FROZEN (space resumes)"
        return f"▶ live every {self.interval:g}s"

    def _render_header(self) -> None:
        self.query_one(HeaderBar).show(self.header_info, self.sample, self._status())

    def _render_latency(self) -> None:
        s = self.sample
        if s is None:
            return
        key = self.query_one(VcpuTable).selected_key if self.hist_selected else None
        found = find_vcpu(s, key) if key else None
        if found is not None:
            t, v = found
            who = f"vCPU {v.vcpu if v.vcpu is not None else v.tid} of {t.pid}"
            ser = self.history.vcpus.get(key)
            if self.hist_cumulative and ser is not None:
                hist, parts, faults, max_us = ser.hist_total, ser.parts_total, ser.faults_total, ser.max_us
            else:
                hist, parts, faults, max_us = v.hist, v.parts, v.faults, v.max_us
        else:
            who = "all vCPUs"
            if self.hist_cumulative:
                hist, parts, max_us = self.history.hist_total, self.history.parts_total, self.history.max_us
                faults = sum(x.faults_total for x in self.history.vcpus.values())
            else:
                hist, parts, faults = _sum_interval(s)
                max_us = max((v.max_us for t in s.targets for v in t.vcpus if v.max_us is not None), default=None)
        span = "since watching" if self.hist_cumulative else "last interval"
        self.query_one(LatencyHistogram).show(hist, f"{who}, {span}", max_us)
        self.query_one(StallBreakdown).show(parts, faults, f"{who}, {span}", s.probe_tier)

    def _log_event(self, e: Event) -> None:
        self.query_one(EventLog).add(e)

    def on_vcpu_table_highlighted(self, _: VcpuTable.Highlighted) -> None:
        if self.hist_selected:
            self._render_latency()

    def on_vcpu_table_selected(self, _: VcpuTable.Selected) -> None:
        self.action_detail()

    # -- view actions ------------------------------------------------------
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.key_help()))

    def key_help(self) -> list[KeyHelp]:
        rows = []
        for section, b, title in KEYS:
            ok = self._action_available(b.action.split("(")[0])
            why = UNAVAILABLE.get(section, "")
            rows.append(KeyHelp(section, b.key_display or b.key, title.removeprefix(f"{section}: "), ok, why))
            if b.action == "quit":
                rows.append(KeyHelp(section, "ctrl+c", "Quit, as interrupted (exit status 130)"))
        rows.append(KeyHelp("Palette", "ctrl+p", "Command palette: every action above by name"))
        return rows

    def action_freeze(self) -> None:
        if self.playback is not None:
            self.playback.toggle_pause()
        else:
            self.frozen = not self.frozen
            if not self.frozen:
                self.render_all()
        self._render_header()

    def action_rate(self, faster: bool) -> None:
        if self.playback is not None:
            self.playback.set_speed(step_in(SPEED_STEPS, self.playback.speed, up=faster))
        elif self.live is not None:
            self.interval = step_in(INTERVAL_STEPS, self.interval, up=not faster)
            self.live.set_interval(self.interval)
        self._render_header()

    def action_sort(self) -> None:
        self.query_one(VcpuTable).cycle_sort()

    def action_reverse_sort(self) -> None:
        self.query_one(VcpuTable).reverse_sort()

    def action_detail(self) -> None:
        key = self.query_one(VcpuTable).selected_key
        if key is None or isinstance(self.screen, VcpuDetailScreen):
            return
        screen = VcpuDetailScreen(key)
        self.push_screen(screen)
        screen.call_after_refresh(screen.show_sample, self.displayed or self.sample, self.history)

    def action_hist_scope(self) -> None:
        self.hist_selected = not self.hist_selected
        self._render_latency()

    def action_hist_span(self) -> None:
        self.hist_cumulative = not self.hist_cumulative
        self._render_latency()

    def action_step(self) -> None:
        if self.playback is not None:
            self.playback.step()
        self._render_header()

    def action_seek(self, seconds: float) -> None:
        if self.playback is not None:
            self.playback.seek_seconds(seconds)

    # -- engine controls ---------------------------------------------------
    def _learn_controls(self, s: Sample) -> None:
        """Which extra commands the engine takes: asked of the client, or listed
        by the engine in its status (migration extra "commands")."""
        if self.controls is None:
            return
        has_migration = any(t.migration for t in s.targets)
        changed = has_migration != self._had_migration
        self._had_migration = has_migration
        supports = self.controls.supports  # pctop.ui.feeds.Controls
        listed: set[Command] = set()
        for t in s.targets:
            if t.migration is not None:
                listed |= set(t.migration.commands)
                limit = t.migration.bandwidth_limit_bps
                if limit is not None:
                    self.bandwidth_limit = limit
        for cmd in (*BASE_COMMANDS, *EXTRA_COMMANDS):
            if cmd in BASE_COMMANDS:
                ok = supports(cmd)
            else:
                ok = cmd not in self.refused and (
                    cmd in listed or supports(cmd))
            changed |= self.supported.get(cmd, False) != ok
            self.supported[cmd] = ok
        if changed:
            self.refresh_bindings()

    def _action_available(self, action: str) -> bool:
        if action in REPLAY_ACTIONS:
            return self.is_replay
        if action in ENGINE_ACTIONS:
            # Controls act on a migration: show them once a source reports one.
            return (self.controls is not None and self._control_pid() is not None
                    and self.supported.get(ENGINE_ACTIONS[action], False))
        return True

    def _control_pid(self) -> int | None:
        """The engine to command: the selected row's target if it migrates, else the first."""
        migrating = [t.pid for t in (self.sample.targets if self.sample else ()) if t.migration]
        if not migrating:
            return None
        key = self.query_one(VcpuTable).selected_key
        return key[0] if key and key[0] in migrating else migrating[0]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in DASHBOARD_ACTIONS:
            return not isinstance(self.screen, VcpuDetailScreen)
        if action in REPLAY_ACTIONS or action in ENGINE_ACTIONS:
            return self._action_available(action)
        return True

    def _stream_paused(self) -> bool:
        for t in (self.sample.targets if self.sample else ()):
            m = t.migration
            if m is not None:
                bg = m.background
                return bg == "paused" if bg else m.state == MigrationState.PAUSED
        return False

    def action_stream(self) -> None:
        self.send_control(Command.RESUME if self._stream_paused() else Command.PAUSE)

    def action_bandwidth(self, up: bool) -> None:
        cur = self.bandwidth_limit
        if not cur:  # unlimited: start below what the stream moves now
            measured = next((t.migration.bandwidth_bps for t in (self.sample.targets if self.sample else ())
                             if t.migration and t.migration.bandwidth_bps), None)
            cur = measured or BANDWIDTH_STEPS[-1] * 2
            if up:
                self.notify("bandwidth is already unlimited", timeout=3)
                return
        bigger = [b for b in BANDWIDTH_STEPS if b > cur]
        smaller = [b for b in BANDWIDTH_STEPS if b < cur]
        new = (bigger[0] if bigger else 0) if up else (smaller[-1] if smaller else BANDWIDTH_STEPS[0])
        self.bandwidth_limit = new
        self.send_control(Command.BANDWIDTH, new)

    def action_latency(self) -> None:
        i = LATENCY_STEPS_US.index(self.latency_us) if self.latency_us in LATENCY_STEPS_US else 0
        self.latency_us = LATENCY_STEPS_US[(i + 1) % len(LATENCY_STEPS_US)]
        self.send_control(Command.LATENCY, self.latency_us)

    def action_drop_link(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.send_control(Command.DROP_LINK)
        self.push_screen(ConfirmScreen("Drop the migration link? Faulting vCPUs will stall until "
                                       "you recover it (r)."), answered)

    def action_recover(self) -> None:
        self.send_control(Command.RECOVER)

    def action_enable_postcopy(self) -> None:
        self.send_control(Command.ENABLE_POSTCOPY)

    def action_start_postcopy(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.send_control(Command.START_POSTCOPY)
        self.push_screen(ConfirmScreen("Switch to post-copy? There is no way back: the destination runs "
                                       "the VM from now on, and if the link fails before the last page "
                                       "arrives, the VM is lost."), answered)

    def send_control(self, cmd: Command, arg: Any = None) -> None:
        self._send_control(cmd, arg, self._control_pid())

    @work(thread=True, group="controls", exit_on_error=False)
    def _send_control(self, cmd: Command, arg: Any, pid: int | None) -> dict:
        """Runs in a thread: the control socket must never block the UI."""
        try:
            reply = self.controls.send(cmd, arg, pid=pid)  # pctop.ui.feeds.Controls
        except Exception as e:  # a dead socket is an event, not a crash
            reply = {"ok": False, "cmd": cmd, "error": str(e)}
        self._post(self._control_done, cmd, arg, reply)
        return reply

    def _control_done(self, cmd: Command, arg: Any, reply: dict) -> None:
        self.control_log.append(reply)
        what = cmd if arg is None else f"{cmd} {_arg_text(cmd, arg)}"
        if reply.get("ok"):
            self._log_event(Event(time.time(), "control", f"{what}: ok"))
            return
        err = str(reply.get("error", "failed"))
        if cmd in EXTRA_COMMANDS and "unknown" in err.lower():
            self.refused.add(cmd)  # the engine does not have it after all: hide the key
            self.supported[cmd] = False
            self.refresh_bindings()
        self._log_event(Event(time.time(), "error", f"{what}: {err}"))
        self.notify(f"{what}: {err}", severity="error", timeout=4)

    # -- command palette ---------------------------------------------------
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for _, b, title in KEYS:
            name = b.action.split("(")[0]
            if name in ("quit", "help") or not self._action_available(name):
                continue
            yield SystemCommand(title, f"key {b.key_display or b.key}", _bound(self, b.action))


def _bound(app: PctopApp, action: str):
    async def run() -> None:
        await app.run_action(action)
    return run


def _arg_text(cmd: Command, arg: Any) -> str:
    if cmd == Command.BANDWIDTH:
        return fmt_bytes(arg, per_s=True) if arg else "unlimited"
    if cmd == Command.LATENCY:
        return fmt_us(arg) if arg else "off"
    return str(arg)


def _sum_interval(s: Sample) -> tuple[tuple[int, ...], StallParts, int]:
    """Every vCPU row of the Sample: histograms merged (pctop.hist), parts and faults summed."""
    hist = EMPTY
    q = sv = rq = faults = 0
    for t in s.targets:
        for v in t.vcpus:
            hist = merge_counts(hist, v.hist)
            q += v.parts.queued_ns
            sv += v.parts.service_ns
            rq += v.parts.runq_ns
            faults += v.faults
    return hist, StallParts(q, sv, rq), faults

