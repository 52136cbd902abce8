"""The migration controls pctop drives over QMP, one function per user action.

Which end each command goes to (QEMU's rules):
    enable_postcopy     both ends (postcopy-ram); the destination also gets
                        postcopy-blocktime so it measures vCPU blocktime
    listen              destination: migrate-incoming (after -incoming defer)
    start_migration     source: migrate (pre-copy begins)
    start_postcopy      source: migrate-start-postcopy
    set_bandwidth       source: max-bandwidth (pre-copy) / max-postcopy-bandwidth
    pause               either end: migrate-pause (both ends go to postcopy-paused)
    recover             destination: migrate-recover URI, then source: migrate URI resume=true
"""

from __future__ import annotations

import re
import time
from typing import Any

from pctop.model import MigrationState as S
from pctop.qemu.qmp import QmpConnection, QmpError

# QEMU's migration states, and the word the Sample uses for each (docs/schema.md).
STATE_WORDS = {
    "none": S.NONE, "setup": S.SETUP, "active": S.PRECOPY, "device": S.PRECOPY,
    "wait-unplug": S.PRECOPY, "pre-switchover": S.PRECOPY,
    "postcopy-active": S.POSTCOPY, "postcopy-paused": S.PAUSED, "postcopy-recover": S.RECOVERING,
    "completed": S.COMPLETED, "failed": S.FAILED, "cancelling": S.FAILED, "cancelled": S.FAILED,
    "colo": S.COLO,
}
ENDED = ("completed", "failed", "cancelled")


def state_word(qemu_status: str | None) -> S:
    """A status newer than this pctop is UNKNOWN (QEMU's own word stays in extra.qemu_status)."""
    return STATE_WORDS.get(qemu_status or "none", S.UNKNOWN)


def set_capabilities(conn: QmpConnection, **caps: bool) -> None:
    conn.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": name.replace("_", "-"), "state": bool(on)} for name, on in caps.items()]})


def enable_postcopy(conn: QmpConnection, destination: bool) -> list[str]:
    """Turn on post-copy at one end; returns the capabilities set."""
    caps = {"postcopy_ram": True}
    if destination:
        caps["postcopy_blocktime"] = True
    set_capabilities(conn, **caps)
    return [c.replace("_", "-") for c in caps]


def set_bandwidth(src: QmpConnection, bytes_per_s: int, postcopy: bool = True) -> None:
    """Cap the source's stream: max-postcopy-bandwidth (0 = unlimited) or max-bandwidth."""
    key = "max-postcopy-bandwidth" if postcopy else "max-bandwidth"
    src.execute("migrate-set-parameters", {key: int(bytes_per_s)})


def listen(dest: QmpConnection, uri: str) -> None:
    dest.execute("migrate-incoming", {"uri": uri})


def start_migration(src: QmpConnection, uri: str) -> None:
    src.execute("migrate", {"uri": uri})


def start_postcopy(src: QmpConnection) -> None:
    src.execute("migrate-start-postcopy")


def pause(conn: QmpConnection) -> None:
    conn.execute("migrate-pause")


def recover(dest: QmpConnection, src: QmpConnection, uri: str) -> None:
    """Resume a paused post-copy on a new channel: the destination listens on
    `uri` (it is listening when migrate-recover returns, but stays
    postcopy-paused until the source connects), then the source reconnects."""
    dest.execute("migrate-recover", {"uri": uri})
    src.execute("migrate", {"uri": uri, "resume": True})


def query(conn: QmpConnection) -> dict[str, Any]:
    return dict(conn.execute("query-migrate"))


def wait_status(conn: QmpConnection, statuses, timeout: float, poll: float = 0.05) -> dict[str, Any]:
    """Poll query-migrate until its status is one of `statuses` (or a failure)."""
    deadline = time.monotonic() + timeout
    while True:
        info = query(conn)
        st = info.get("status", "none")
        if st in statuses:
            return info
        if st in ("failed", "cancelled") and st not in statuses:
            raise QmpError(f"migration {st}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            raise QmpError(f"migration still {st} after {timeout:.0f} s (waited for {', '.join(statuses)})")
        time.sleep(poll)


_XP_WORD = re.compile(r":\s*0x([0-9a-fA-F]+)")


def read_guest_u32(conn: QmpConnection, gpa: int) -> int:
    """One 32-bit word of guest physical memory (HMP `xp`)."""
    out = conn.hmp(f"xp /1wx {gpa:#x}")
    m = _XP_WORD.search(out)
    if not m:
        raise QmpError(f"unexpected xp output: {out.strip()!r}")
    return int(m.group(1), 16)


def vcpu_threads(conn: QmpConnection) -> dict[int, int]:
    """vCPU index -> host thread id, QEMU's own word (query-cpus-fast); works with
    KVM and TCG and whether or not QEMU names its threads."""
    return {int(c["cpu-index"]): int(c["thread-id"]) for c in conn.execute("query-cpus-fast")}


def local_uri() -> str:
    """A migration URI on this host nobody listens on yet (for demo runs and recovery)."""
    from pctop.qemu.launch import free_port
    return f"tcp:127.0.0.1:{free_port()}"
