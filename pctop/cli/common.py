"""What every pctop command shares: its errors, its exit statuses, its options.

Rules (README "How runs end", pctop/exits.py): bad input is one line on stderr
and exit status 2 (UsageError); something asked for that cannot run here (no
such process or socket, no privilege) is one line and status 1 (Unavailable).
Commands are `Command` (a click command) or `Group`, whose click usage errors
become those one-liners too.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import click

from pctop.sizes import parse_size

HELP = {"help_option_names": ["-h", "--help"]}


class UsageError(click.ClickException):
    """Bad input: one line on stderr, exit status 2."""

    exit_code = 2

    def __init__(self, command: str, message: str) -> None:
        super().__init__(message)
        self.command = command

    def show(self, file=None) -> None:
        click.echo(f"pctop {self.command}: error: {self.message}", err=True)


class Unavailable(UsageError):
    """What was asked for cannot run on this machine: one line, exit status 1."""

    exit_code = 1


class _OneLineUsage:
    """click's usage errors (a bad option, a missing argument) as UsageError one-liners."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)  # type: ignore[misc]
        except click.UsageError as e:
            raise UsageError(info_name or self.name, e.format_message()) from None  # type: ignore[attr-defined]


class Command(_OneLineUsage, click.Command):
    """A click command whose usage errors are one line (no usage block)."""


class Group(_OneLineUsage, click.Group):
    """A click group with the same one-line usage errors, for itself and its commands."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if isinstance(e, UsageError):
                raise
            raise UsageError(ctx.info_name or self.name, e.format_message()) from None


class SizeType(click.ParamType):
    """A byte count: 512M, 2G, 1048576 (pctop.sizes)."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


def live_options(f: Callable) -> Callable:
    """The target selection and sampling options of monitor, record and export."""
    for opt in reversed([
        click.option("-p", "--pid", "pids", multiple=True, type=click.IntRange(min=1),
                     help="Watch this process (repeatable). Default: every process holding a "
                          "userfaultfd or KVM vCPU fd."),
        click.option("--comm", metavar="NAME", help="Watch processes whose command name is NAME."),
        click.option("--interval", type=click.FloatRange(min=0.05, max=3600), default=1.0,
                     show_default=True, help="Seconds between samples."),
        click.option("--count", type=click.IntRange(min=1), help="Stop after N samples."),
        click.option("--no-ebpf", is_flag=True, help="Use /proc only (no eBPF probes)."),
        click.option("--engine", "engine_sockets", multiple=True, metavar="SOCKET",
                     help="Also read this reference-engine control socket (repeatable; "
                          "/run/pctop/engine-*.sock are found anyway)."),
        click.option("--qmp", "qmp_sockets", multiple=True, metavar="SOCKET",
                     help="QEMU's QMP socket: the migration destination's, then optionally the "
                          "source's (docs/qemu.md)."),
        click.option("--qmp-source", metavar="SOCKET",
                     help="QEMU's QMP socket of the migration's source, when this host runs the "
                          "source (without --qmp) or the destination's is given with --qmp."),
        click.option("--page-ranges", is_flag=True,
                     help="Also record which pages each uffd installed (address ranges per "
                          "interval; one more probe map update per install). JSON output only."),
    ]):
        f = opt(f)
    return f


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM and Ctrl-C end a sampling loop at its next wait instead of mid-write."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
