"""`pctop monitor`, `pctop record`, `pctop replay`: the headless (JSON Lines) paths.

Nothing here imports Textual or bcc: bcc is imported inside the eBPF source
only when it is used, and the TUI branches import pctop.ui, which loads
Textual only inside its run_* functions.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

import click

from pctop import rates
from pctop.cli.common import Command, Unavailable, UsageError, install_stop_handlers, live_options
from pctop.sinks.ndjson import NdjsonWriter


def stream_json(command: str, out: TextIO, pids, comm, interval: float, count: int | None,
             no_ebpf: bool, engine_sockets, qmp_sockets=(), page_ranges: bool = False,
             export: str | None = None) -> None:
    """Header, then one Sample per interval to `out`, until count, a signal or a closed pipe.
    export: also serve the Samples on /metrics at this [HOST:]PORT (pctop.cli.export)."""
    stop = threading.Event()
    install_stop_handlers(stop)
    header, stats, _ = open_samples(command, pids, comm, interval, no_ebpf, engine_sockets, qmp_sockets,
                             page_ranges)
    server = None
    writer = NdjsonWriter(out)
    try:
        if export is not None:
            stats, server = _serve(command, export, header, stats)
        writer.write(header)
        sample_loop(stats, interval, count, stop, writer.write)
    except BrokenPipeError:
        _quiet_stdout()
    finally:
        if server is not None:
            server.close()
        stats.close()


def sample_loop(stats, interval: float, count: int | None, stop: threading.Event, emit) -> None:
    """emit(stats.collect()) once per interval until `count` samples or `stop`."""
    n = 0
    due = time.monotonic() + interval
    while not stop.wait(max(0.0, due - time.monotonic())):
        emit(stats.collect())
        n += 1
        if count is not None and n >= count:
            break
        due = rates.next_due(due, interval, time.monotonic())


def _serve(command: str, listen: str, header, stats):
    """--export: (stats whose Samples also feed /metrics, the server to close)."""
    from pctop.cli.export import start_server
    from pctop.root import Tap

    exporter, server = start_server(command, listen, header)
    return Tap(stats, exporter.observe), server


def qmp_ends(command: str, qmp_sockets, qmp_source: str | None) -> tuple:
    """--qmp DEST [--qmp SOURCE] and --qmp-source SOURCE -> the sockets for attach():
    (DEST, SOURCE), (DEST,) or (None, SOURCE) on a host that runs only the source."""
    qmp_sockets = tuple(qmp_sockets)
    if qmp_source is None:
        return qmp_sockets
    if len(qmp_sockets) > 1:
        raise UsageError(command, "give the source's QMP socket once: as a second --qmp or as --qmp-source")
    return (qmp_sockets[0] if qmp_sockets else None, qmp_source)


def _check_page_ranges(command: str, page_ranges: bool, no_ebpf: bool) -> None:
    if page_ranges and no_ebpf:
        raise UsageError(command, "--page-ranges needs the eBPF probes; it cannot go with --no-ebpf")


def open_samples(command: str, pids, comm, interval: float, no_ebpf: bool, engine_sockets, qmp_sockets,
          page_ranges: bool = False):
    """pctop.root.open_pipeline with one-line errors -> (header, stats, qmp source or None)."""
    from pctop.qemu.qmp import QmpError
    from pctop.root import PageRangesUnavailable, open_pipeline
    from pctop.sources.engine import EngineUnreachable
    from pctop.sources.procfs import TargetNotFound

    _check_page_ranges(command, page_ranges, no_ebpf)
    if len(qmp_sockets) > 2:  # bad input, said before any probe is loaded
        raise UsageError(command, "--qmp takes the destination's socket, then optionally the source's "
                                   "(at most two)")
    try:
        return open_pipeline(pids, comm, use_ebpf=not no_ebpf, engine_sockets=engine_sockets,
                             qmp_sockets=qmp_sockets, page_ranges=page_ranges)
    except (TargetNotFound, EngineUnreachable, QmpError) as e:  # nothing to watch there: unavailable
        raise Unavailable(command, str(e)) from None
    except PageRangesUnavailable as e:
        raise Unavailable(command, str(e)) from None


def _quiet_stdout() -> None:
    """The reader went away (e.g. `| head`): stop without a traceback at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


@click.command("monitor", cls=Command)
@live_options
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON Lines (a header, then one sample per interval) instead of the TUI.")
@click.option("--export", metavar="[HOST:]PORT",
              help="Also serve what is shown as Prometheus metrics on /metrics, like `pctop export` "
                   "(host 127.0.0.1 unless given; docs/metrics.md).")
def monitor(pids, comm, interval, count, no_ebpf, engine_sockets, qmp_sockets, qmp_source, page_ranges,
            as_json, export) -> None:
    """Watch post-copy stalls live: per-vCPU faults and latency, uffd queue depth.

    Fields are documented in docs/schema.md.
    """
    qmp_sockets = qmp_ends("monitor", qmp_sockets, qmp_source)
    if not as_json:
        if page_ranges:
            raise UsageError("monitor", "--page-ranges goes with --json (or `pctop record`): "
                                         "the dashboard does not show page ranges")
        _run_tui(pids, comm, interval, no_ebpf, engine_sockets, qmp_sockets, export)
        return
    stream_json("monitor", sys.stdout, pids, comm, interval, count, no_ebpf, engine_sockets, qmp_sockets,
             page_ranges, export)


def _run_tui(pids, comm, interval: float, no_ebpf: bool, engine_sockets, qmp_sockets=(),
             export: str | None = None) -> None:
    """The dashboard (pctop.ui); Textual is imported only on this path."""
    from pctop import ui
    from pctop.root import engine_controls

    header, stats, qmp = open_samples("monitor", pids, comm, interval, no_ebpf, engine_sockets, qmp_sockets)
    server = None
    if export is not None:
        try:
            stats, server = _serve("monitor", export, header, stats)
        except BaseException:
            stats.close()
            raise
    try:
        ui.run_live(header, stats, interval, controls=qmp if qmp is not None else engine_controls(stats))
    finally:
        if server is not None:
            server.close()


@click.command("record", cls=Command)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, writable=True),
              help="File to write (JSON Lines, flushed line by line).")
@live_options
def record(output, pids, comm, interval, count, no_ebpf, engine_sockets, qmp_sockets, qmp_source,
           page_ranges) -> None:
    """Record what `monitor --json` shows to a file, for `pctop replay`."""
    qmp_sockets = qmp_ends("record", qmp_sockets, qmp_source)
    _check_page_ranges("record", page_ranges, no_ebpf)  # before the file is created
    try:
        fh = open(output, "w", encoding="utf-8")
    except OSError as e:
        raise UsageError("record", f"cannot write {output}: {e.strerror}") from None
    with fh:
        stream_json("record", fh, pids, comm, interval, count, no_ebpf, engine_sockets, qmp_sockets,
                 page_ranges)


@click.command("replay", cls=Command)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the recording as JSON Lines.")
@click.option("--speed", type=click.FloatRange(min=0.01, max=1000), default=1.0, show_default=True,
              help="Playback speed in the TUI (2 = twice real time).")
def replay(file, as_json, speed) -> None:
    """Play a recording back (from `pctop record` or `monitor --json`).

    A damaged recording is shown up to the bad line, then an error naming it (exit 2).
    """
    from pctop.sources.replay import Recording, RecordingError

    if not as_json:
        from pctop import root

        try:
            root.run_replay(file, speed=speed)
        except RecordingError as e:
            raise UsageError("replay", str(e)) from None
        return
    writer = NdjsonWriter(sys.stdout)
    try:
        with Recording(file) as rec:
            for record in rec.records(final=True):
                writer.write(record)
    except RecordingError as e:
        raise UsageError("replay", str(e)) from None
    except BrokenPipeError:
        _quiet_stdout()
