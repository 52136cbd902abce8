"""The control commands: one vocabulary for what steers a migration and what obeys.

The dashboard's keys send them through its Controls (pctop.ui.feeds) to the reference
engine's control socket (pctop.sources.engine -> pctop.engine.control,
docs/engine-control.md) or to QEMU over QMP (pctop.sources.qmp); `pctop ctl` sends
them from the command line. A member is the string on the wire ({"cmd": "drop-link"}).
This module is at the bottom of the layers (tests/unit/test_layers.py), so the engine,
the collectors, the dashboard and the command line all import it.
"""

from __future__ import annotations

from enum import StrEnum


class Command(StrEnum):
    STATUS = "status"  # the engine's state and counters
    PAUSE = "pause"  # the background stream (demand faults are still served)
    RESUME = "resume"
    BANDWIDTH = "bandwidth"  # arg: bytes/s of the background stream, 0 = unlimited
    LATENCY = "latency"  # arg: microseconds added to every demand reply
    DROP_LINK = "drop-link"  # close every channel to the source, as a failed link would
    RECOVER = "recover"  # reconnect after a link failure
    ENABLE_POSTCOPY = "enable-postcopy"  # QEMU: post-copy on at both ends
    START_POSTCOPY = "start-postcopy"  # QEMU: switch a running migration to post-copy


# What the reference engine takes: its status lists them (Migration.commands), `pctop ctl` offers them.
ENGINE_COMMANDS = (Command.STATUS, Command.PAUSE, Command.RESUME, Command.BANDWIDTH, Command.LATENCY,
                   Command.DROP_LINK, Command.RECOVER)
# What every engine takes, listed or not (engines older than the list).
BASE_COMMANDS = (Command.BANDWIDTH, Command.PAUSE, Command.RESUME)
