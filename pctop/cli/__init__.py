"""The `pctop` command line.

Subcommands are loaded lazily (click's documented LazyGroup pattern): the
top-level group only knows "name -> module:attribute", so `pctop --help`,
`pctop doctor` and every `--json` path start without importing Textual or
bcc. Each subcommand module imports what it needs inside its own body.
"""

from __future__ import annotations

import importlib
import sys

import click

from pctop import __version__
from pctop.cli.common import HELP

# name -> (module, attribute, one-line help shown by `pctop --help`)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("pctop.cli.demo", "demo", "Run the reference engine: a real post-copy migration of a KVM guest."),
    "ctl": ("pctop.cli.ctl", "ctl", "Send one command to a running engine's control socket (pause, latency, drop-link, ...)."),
    "doctor": ("pctop.cli.doctor", "doctor", "Check what pctop needs and say how to fix what is missing."),
    "export": ("pctop.cli.export", "export", "Serve Prometheus metrics on /metrics (headless; docs/metrics.md)."),
    "engine": ("pctop.cli.engine", "engine", "Run the engine's source and destination as two processes (TCP, two hosts)."),
    "monitor": ("pctop.cli.monitor", "monitor", "Watch post-copy stalls live (--json: JSON Lines)."),
    "qemu": ("pctop.cli.qemu", "qemu", "Steer a QEMU post-copy migration over QMP (pause, recover, bandwidth, ...)."),
    "record": ("pctop.cli.monitor", "record", "Record what monitor shows to a JSON Lines file."),
    "replay": ("pctop.cli.monitor", "replay", "Play a recording back."),
}


class _Stopped(Exception):
    """Carries the KeyboardInterrupt (or pctop.exits.Interrupted) that ended a command."""

    def __init__(self, cause: KeyboardInterrupt) -> None:
        super().__init__(str(cause))
        self.cause = cause


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when it is run."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(SUBCOMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in SUBCOMMANDS:
            module, attr, _ = SUBCOMMANDS[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            # Past click's own handler, which would add a blank line and "Aborted!":
            # main() says what ended the run.
            raise _Stopped(e) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Use the static help text so that `pctop --help` imports nothing.
        rows = [(name, SUBCOMMANDS[name][2]) for name in sorted(SUBCOMMANDS)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, invoke_without_command=True,
             context_settings=HELP)
@click.version_option(__version__, prog_name="pctop")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """pctop: live view of post-copy migration on Linux/KVM.

    Shows per-vCPU fault rates, userfaultfd queue depth and fault-resolution
    latency for any VMM, from tracepoint-only eBPF probes and /proc.
    """
    if ctx.invoked_subcommand is None:
        # Bare `pctop` means "watch what is running"; until the TUI exists,
        # the doctor is the most useful thing to show.
        default = "monitor" if "monitor" in SUBCOMMANDS else "doctor"
        ctx.invoke(cli.get_command(ctx, default))


def _command_name(argv: list[str]) -> str:
    words = [a for a in argv if not a.startswith("-")][:1]
    return " ".join(["pctop"] + [w for w in words if w in SUBCOMMANDS])


def main() -> None:
    """Run the command; every way it ends is one line at most and a status of pctop.exits."""
    from pctop import exits

    exits.raise_on_termination()
    try:
        rv = cli.main(prog_name="pctop", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (_Stopped, click.exceptions.Abort, KeyboardInterrupt) as e:
        cause = e.cause if isinstance(e, _Stopped) else e if isinstance(e, KeyboardInterrupt) else e.__context__
        cause = cause if isinstance(cause, KeyboardInterrupt) else KeyboardInterrupt()
        click.echo(f"{_command_name(sys.argv[1:])}: {exits.what(cause)}", err=True)
        sys.exit(exits.status_of(cause))
    sys.exit(rv if isinstance(rv, int) else 0)
