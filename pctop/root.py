"""The composition root: the one module that picks, starts and stops pctop's parts.

Which collectors run on this machine (pctop.sources: eBPF, procfs, the engine's
control socket, QEMU's QMP), which child processes a demo starts (the reference
engine, two QEMUs) and which view gets the Samples (the dashboard, JSON Lines)
are decided here and nowhere below: the aggregator (pctop.stats) is handed its
sources, the views (pctop.ui, pctop.sinks, pctop.export) are handed a feed of
Samples, the engine and QEMU code never see either. The command line
(pctop.cli) turns the user's options into calls of these functions, and their
exceptions into one-line errors. tests/unit/test_layers.py holds the layering.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pctop import __version__
from pctop.hostpaths import DEFAULT
from pctop.model import Header, MigrationState, ProbeTier
from pctop.stats import Stats

# ---- the live pipeline: collectors chosen for this machine ------------------------------


class PageRangesUnavailable(RuntimeError):
    """Installed page ranges were asked for, but the eBPF probes cannot run (one line why)."""


EBPF_MISSING_EFFECT = ("per-vCPU fault counts, stall times, percentiles, histograms, stall parts, "
                       "exits and handler reads/installs are not measured; uffd queue depth, "
                       "vCPU identity and handler CPU come from /proc")


def engine_controls(stats: Any) -> Any:
    """What the dashboard's keys drive when it watches engines: the engine source that
    open_live put among the Stats' sources (a Tap passes them through), None without one."""
    from pctop.sources.engine import EngineSource

    return next((s for s in getattr(stats, "sources", ()) if isinstance(s, EngineSource)), None)


def start_ebpf(pids: tuple[int, ...], follow_all: bool, page_map: bool = False, comm: str | None = None):
    """(started EbpfSource, None) or (None, why not). bcc is imported only here."""
    try:
        from pctop.sources import ebpf
    except ImportError as e:
        if getattr(e, "name", None) == "pctop.sources.ebpf":
            return None, "this pctop has no eBPF source (pctop/sources/ebpf.py missing)"
        return None, f"the eBPF source failed to import: {e}"
    reason = ebpf.ebpf_unavailable_reason()
    if reason:
        return None, reason
    src = ebpf.EbpfSource(list(pids), follow_all, page_map=page_map, comm=comm)
    try:
        src.start()
    except Exception as e:  # probes failed to compile/attach: run on procfs
        try:
            src.close()
        except Exception:
            pass
        return None, f"eBPF probes failed to load: {type(e).__name__}: {e}"
    return src, None


def open_live(pids: Sequence[int] = (), comm: str | None = None, *, use_ebpf: bool = True,
              engine_sockets: Sequence[str] = (), paths=None, page_ranges: bool = False):
    """Pick and start the sources for live monitoring -> (Header, Stats).

    page_ranges: the probes also record which pages each uffd install covered
    (Uffd.installed_ranges, Target.registered_ranges); it needs the eBPF probes,
    so without them it raises PageRangesUnavailable (bad input for the caller).

    Raises pctop.sources.procfs.TargetNotFound for a pid that does not exist
    and pctop.sources.engine.EngineUnreachable for an engine socket that does not
    answer (bad input: the caller turns them into one-line errors).
    The caller paces it: Stats.collect() once per interval (from any one thread; Stats
    measures each actual interval), Stats.close() at the end.
    """
    from pctop.sources.engine import EngineSource
    from pctop.sources.procfs import ProcfsSource, find_by_comm

    paths = paths or DEFAULT
    pids = tuple(pids)
    procfs = ProcfsSource(pids, comm, paths=paths)
    procfs.check_pids()
    missing: list[str] = []
    sources: list = []
    try:
        if use_ebpf:
            initial = pids + tuple(find_by_comm(paths, comm, exclude=(os.getpid(),)) if comm else ())
            ebpf_src, why = start_ebpf(initial, follow_all=not pids and comm is None,
                                        page_map=page_ranges, comm=comm)
        else:
            ebpf_src, why = None, "disabled by --no-ebpf"
        if page_ranges and ebpf_src is None:
            raise PageRangesUnavailable(f"--page-ranges needs the eBPF probes, and they are "
                                        f"unavailable: {why}")
        if ebpf_src is not None:
            sources.append(ebpf_src)
        else:
            missing.append(f"ebpf: {why}; {EBPF_MISSING_EFFECT}")
        engine = EngineSource(engine_sockets, pids=pids or None)
        engine.start()
        sources.append(engine)
        procfs.start()
        sources.append(procfs)
    except BaseException:
        for s in sources:
            s.close()
        raise
    if not os.path.isdir(os.path.join(paths.debugfs, "kvm")):
        missing.append(f"debugfs: {paths.debugfs}/kvm not present; vCPU ids come from thread names")
    tier = ProbeTier.EBPF if ebpf_src is not None else ProbeTier.PROCFS
    stats = Stats(sources, tier)
    header = Header(host=socket.gethostname(), kernel=os.uname().release, probe_tier=tier,
                    sources=stats.source_names, missing=tuple(missing), started=time.time(),
                    pctop_version=__version__)
    return header, stats



def open_pipeline(pids: Sequence[int] = (), comm: str | None = None, *, use_ebpf: bool = True,
                  engine_sockets: Sequence[str] = (), qmp_sockets: Sequence[str | None] = (),
                  page_ranges: bool = False):
    """open_live plus, with QMP sockets, QEMU's own view -> (header, stats, qmp source or None).
    qmp_sockets: (DEST,), (DEST, SOURCE) or (None, SOURCE) (pctop.sources.qmp.attach).
    Raises what open_live raises, and pctop.qemu.qmp.QmpError for a QMP socket that does
    not answer."""
    header, stats = open_live(pids, comm, use_ebpf=use_ebpf, engine_sockets=engine_sockets,
                              page_ranges=page_ranges)
    if not qmp_sockets:
        return header, stats, None
    from pctop.sources.qmp import attach

    try:
        header, qmp = attach(header, stats, qmp_sockets)
    except BaseException:
        stats.close()
        raise
    return header, stats, qmp


class Tap:
    """A Stats (anything with collect() -> Sample) whose every Sample also goes to an
    observer: the exporter of `monitor --export`, the QEMU demo's tally, the engine
    demo's end (DemoEnd). The views it feeds do not know; everything else (close,
    sources) passes through."""

    def __init__(self, stats: Any, observe: Callable[[Any], None]) -> None:
        self._stats = stats
        self._observe = observe

    def collect(self) -> Any:
        sample = self._stats.collect()
        self._observe(sample)
        return sample

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stats, name)


# ---- replay: a recording as a feed -------------------------------------------------------


def open_replay(path: str, **kw: Any) -> Any:
    """A recording as the dashboard's ReplayFeed (kw: speed, paused, position).

    Raises pctop.sources.replay.RecordingError with a one-line message when nothing
    can be shown. A recording damaged further on plays up to the bad line: the last
    sample then carries the error as an event, and the feed's `.error` holds it."""
    from dataclasses import replace

    from pctop.model import Event
    from pctop.sources.replay import Recording, RecordingError
    from pctop.ui.feeds import ReplayFeed

    with Recording(path) as rec:
        try:
            rec.load_more(final=True)
        except RecordingError:
            if rec.header is None or not rec.samples:
                raise
    if not rec.samples:
        raise RecordingError(f"{path}: the recording holds no samples")
    samples = rec.samples
    if rec.error is not None:
        last = samples[-1]
        note = Event(last.time, "error", f"the recording ends here: {rec.error}")
        samples = samples[:-1] + [replace(last, events=last.events + (note,))]
    assert rec.header is not None  # a recording with samples has its header
    feed = ReplayFeed(rec.header, samples, **kw)
    feed.error = rec.error
    return feed


def run_replay(path: str, speed: float = 1.0, paused: bool = False) -> None:
    """The dashboard over a recording. Raises pctop.sources.replay.RecordingError
    (one-line message) for a bad file, at once when nothing of it can be shown, else
    after showing it up to the bad line."""
    from pctop import ui

    feed = open_replay(path, speed=speed, paused=paused)
    ui.run_feed(feed)
    if feed.error is not None:
        raise feed.error


# ---- child processes ------------------------------------------------------------------------


def wait_for_path(path: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until a child has made `path` (its socket); False if it exited or timed out first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_child(proc: subprocess.Popen, grace: float = 10) -> bool:
    """SIGTERM a child that still runs, SIGKILL after `grace` seconds; True if it was running."""
    running = proc.poll() is None
    if running:
        proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return running


# ---- `pctop demo`: the reference engine under the dashboard ---------------------------------


def run_engine_demo(engine_argv: list[str], control_path: str, interval: float = 1.0,
                    use_ebpf: bool = True, env: dict[str, str] | None = None) -> int | None:
    """`pctop demo` without --headless: the engine runs as a child process
    (`engine_argv`, a headless demo command line serving `control_path`) so
    that it never shares a GIL with the dashboard; the dashboard watches it
    with its controls live. Quitting the dashboard stops the engine. Prints
    the engine's own output (its verification summary) afterwards and returns
    its exit status, or None (and prints nothing) when the dashboard quit first and
    stopped it. Raises pctop.sources.engine.EngineUnreachable if it never opens its socket
    (the message quotes the end of its stderr).
    """
    from pctop import ui
    from pctop.sources.engine import EngineUnreachable

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(engine_argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        try:
            if not wait_for_path(control_path, proc, 60):
                err.seek(0)
                tail = err.read().strip().splitlines()[-1:] or ["no output"]
                raise EngineUnreachable(f"the engine did not open {control_path}: {tail[0]}")
            try:
                header, stats = open_live([proc.pid], None, use_ebpf=use_ebpf,
                                          engine_sockets=[control_path])
            except EngineUnreachable:
                try:  # a run short enough to end before we looked: its own output says it all
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                if proc.returncode is None:
                    raise
                return _relay(proc, out, err)
            demo = DemoEnd(stats, proc, out)
            ui.run_live(header, demo, interval, controls=engine_controls(stats), ended=lambda: demo.ended)
        finally:
            stopped = stop_child(proc, 15)
        if stopped:  # its output only says it was stopped; the caller says so itself
            return None
        return _relay(proc, out, err)


def _relay(proc: Any, out: Any, err: Any) -> int:
    """Print a finished engine child's output; its exit status."""
    for fh, stream in ((out, sys.stdout), (err, sys.stderr)):
        fh.seek(0)
        stream.write(fh.read())
    return proc.returncode


class DemoEnd(Tap):
    """The demo's stream, ended by the engine child's exit on its last view, saying how
    the run ended.

    The engine closes its control socket and exits when it finishes, so the plain
    stream would clear the dashboard to "no targets found yet". This tap watches every
    Sample for the last one that showed the run's migration, and polls the child (which
    also reaps it, so the procfs source sees it gone instead of a lingering zombie). Once
    the child has exited it hands out that last view once more, its migration marked
    completed or failed, with the engine's last lines and the verdict as events; then
    nothing more (the view stays; `ended` is the verdict for the header).

    A Tap and not only an observer on one: an observer sees the stream but cannot end it
    or add the verdict Sample, which is what this is for. The pass-through (sources,
    close) is Tap's.
    """

    def __init__(self, stats: Any, proc: subprocess.Popen, out: Any) -> None:
        super().__init__(stats, self._watch)
        self._proc, self._out = proc, out
        self._last: Any = None  # the last Sample that showed the run's migration
        self.ended: str | None = None

    def _watch(self, sample: Any) -> None:
        if any(t.migration is not None for t in sample.targets):
            self._last = sample

    def collect(self) -> Any:
        if self.ended is not None:
            return None
        sample = super().collect()
        if self._proc.poll() is None:
            return sample
        self.ended = verdict(self._proc.returncode)
        self._out.seek(0)
        lines = [line for line in self._out.read().splitlines() if line.strip()]
        return final_sample(self._last or sample, sample, self._proc.returncode == 0,
                            lines[-3:] + [f"{self._proc.pid}: {self.ended}; q quits"])


def verdict(returncode: int) -> str:
    """How a demo's engine child ended, in the words the dashboard's header shows."""
    if returncode == 0:
        return "demo finished: verified"
    if returncode < 0:
        import signal
        return f"demo FAILED (the engine was ended by {signal.Signals(-returncode).name})"
    return f"demo FAILED (exit {returncode})"


def final_sample(last: Any, now: Any, ok: bool, lines: list[str]) -> Any:
    """`last` (the last view of the run) as of `now` (the Sample of the interval the run
    ended in): its migrations completed (all pages) or failed, `now`'s events and then
    `lines` as "state" events. The verdict line goes last, as "<pid>: ...", so the
    event log adds no state edge after it."""
    from dataclasses import replace

    from pctop.model import Event

    def done(t: Any) -> Any:
        m = t.migration
        if m is None:
            return t
        got = m.pages_total if ok else m.pages_received
        return replace(t, migration=replace(m, state=MigrationState.COMPLETED if ok else MigrationState.FAILED,
                                            eta_s=None, pages_received=got))
    events = tuple(Event(now.time, "state", line) for line in lines)
    return replace(last, seq=now.seq, time=now.time, targets=tuple(done(t) for t in last.targets),
                   events=now.events + events)


# ---- `pctop demo --vmm qemu`: two QEMUs under the dashboard or JSON Lines --------------------


def run_qemu_demo(mode: str, accel: str, postcopy_bandwidth: int | None = None, interval: float = 0.5) -> int:
    """mode: "tui" | "headless" | "json". Returns the exit status (0: migrated and the
    guest runs on the destination)."""
    from pctop.qemu import demo as qd
    from pctop.qemu.launch import QemuUnavailable
    from pctop.qemu.migration import MIB, MigrationSettings, QemuMigration
    from pctop.qemu.qmp import QmpError
    from pctop.sources.qmp import attach

    settings = MigrationSettings(accel=accel, vcpus=2, region_mib=16,
                                 postcopy_bandwidth=postcopy_bandwidth or 2 * MIB)
    mig = QemuMigration(settings)
    say = (lambda m: None) if mode != "headless" else qd.tell
    say(f"starting source and destination QEMU ({accel}, {settings.vcpus} vCPUs, {settings.memory_mib} MiB, "
        f"guest writes {settings.region_mib} MiB, post-copy capped at {settings.postcopy_bandwidth >> 10} KiB/s)")
    driver: threading.Thread | None = None
    outcome: dict[str, Any] = {}
    try:
        mig.boot()
        dest, source, dest_qmp = mig.pair.destination, mig.pair.source, mig.dst
        assert dest is not None and source is not None and dest_qmp is not None  # boot() started both
        header, stats = open_live((dest.pid, source.pid), None)
        try:
            header, qmp = attach(header, stats, [dest.qmp_path, source.qmp_path])
        except BaseException:
            stats.close()
            raise
        for why in header.missing:  # e.g. no eBPF: pctop's own stall numbers are not measured
            say(f"degraded: {why}")
        tally = qd.Tally(dest.pid)
        rec = Tap(stats, tally.add)
        rec.collect()  # the probes follow both QEMUs before the destination registers its memory

        def drive() -> None:
            try:
                outcome["source"] = mig.run(on_step=say, precopy_s=qd.PRECOPY_S)
                outcome["passes"] = [mig.guest_passes(dest_qmp, i) for i in range(settings.vcpus)]
            except BaseException as e:  # reported by _finish; a stopped run's errors are not
                outcome["error"] = str(e) or type(e).__name__

        driver = threading.Thread(target=drive, name="qemu-demo-driver", daemon=True)
        driver.start()
        if mode == "tui":
            from pctop import ui
            ui.run_live(header, rec, interval, controls=qmp)  # closes rec when the user quits
        else:
            qd.headless_loop(mode, header, rec, tally, driver, interval)
        driver.join(timeout=0.1)
        guest_runs = False
        if "passes" in outcome:
            time.sleep(0.3)
            guest_runs = all(mig.guest_passes(dest_qmp, i) > n for i, n in enumerate(outcome["passes"]))
    except (QmpError, QemuUnavailable) as e:
        qd.tell(f"error: {e}")
        return 1
    finally:
        if driver is not None and driver.is_alive():
            # Quit, Ctrl+C or a signal mid-run: say why the next seconds are quiet.
            outcome["stopped"] = True
            qd.tell("stopped before the migration finished, not migrated; stopping both QEMUs")
        mig.close(log=qd.tell)
        if driver is not None:
            driver.join(timeout=5)  # its QMP calls fail now; nothing of it is reported
    return qd.finish(mode, tally, outcome, guest_runs, mig)
