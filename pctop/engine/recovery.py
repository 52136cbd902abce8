"""The destination's side of the link: the channels of the current epoch, noticing
that the link failed, and recovering it (the engine's postcopy-paused / postcopy-recover).

States of the link: `up` -> `down` (a read error or end of stream on any channel, a
failed send, no frame on the background channel for link_timeout, or the drop-link
command) -> `recovering` (the recover command, or by itself with auto_recover, with
backoff) -> `up`, in a new epoch. While it is down the vCPUs that touch a missing
page stay blocked in the kernel; the readers leave their faults queued in the uffd
(visible as its `pending` count). Recovery sends the destination's present-page map
first (the source then sends again exactly what was lost), then asks again for every
page a vCPU waits on. Fatal: the source refuses to resume, its address refuses
connections for give_up_s (it is gone), or the link stays down for recover_timeout.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable

from pctop.engine.dest import DemandPort
from pctop.engine.link import DestLink
from pctop.engine.transport import Channel, HandshakeRefused, ProtocolError

PROBE_EVERY_S = 0.5
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.2, 2.0
_GONE = (errno.ECONNREFUSED, errno.ENOENT)  # nothing listens there (TCP / unix socket)


class Link:
    def __init__(self, dest: DestLink, demand_channels: int,
                 attach: Callable[[list[Channel], Channel, int], object],
                 present: Callable[[], bytearray], after_recovery: Callable[[], None], on_change: Callable[[str], None],
                 auto_recover: bool = False, link_timeout: float = 3.0, give_up_s: float = 5.0,
                 recover_timeout: float = 60.0, log: Callable[[str], None] = lambda m: None):
        self.dest = dest
        self._attach = attach  # starts the epoch's receivers; returns the background receiver
        self._present = present  # the destination's present-page map (a byte per page)
        self._after_recovery = after_recovery
        self._on_change = on_change  # "up" | "down" | "recovering"
        self.auto_recover = auto_recover
        self.link_timeout, self.give_up_s, self.recover_timeout = link_timeout, give_up_s, recover_timeout
        self.log = log
        self.ports = [DemandPort(self.lost) for _ in range(demand_channels)]
        self.state = "down"
        self.epoch = 0
        self.drops = self.recoveries = 0
        self.error: str | None = None  # why the link went down last
        self.fatal: str | None = None  # why the run must fail
        self.up = threading.Event()
        self.settings: dict = {}
        self._lock = threading.Lock()
        self._bg: Channel | None = None
        self._bg_rx = None
        self._chans: list[Channel] = []
        self._down_since = 0.0
        self._refused_since: float | None = None
        self._recover_asked = False
        self._closing = False
        self._thread = threading.Thread(target=self._supervise, name="link", daemon=True)

    # --- the first connection ---
    def connect(self, timeout_s: float) -> dict:
        """Epoch 1. Retries while nothing listens yet (a source still building its
        image), up to timeout_s; HandshakeRefused is final."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                demand, bg, settings = self.dest.connect(1, resume=False)
                break
            except HandshakeRefused:
                raise
            except (OSError, ProtocolError) as e:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"cannot reach the source at {self.dest.addr}: "
                                          f"{getattr(e, 'strerror', None) or e}") from None
                time.sleep(0.1)
        self.settings = settings
        self._install(demand, bg, 1)
        self._thread.start()
        return settings

    def _install(self, demand: list[Channel], bg: Channel, epoch: int) -> None:
        with self._lock:
            self.epoch = epoch
            self._bg, self._chans = bg, demand + [bg]
            self._bg_rx = self._attach(demand, bg, epoch)
            for port, ch in zip(self.ports, demand):
                port.cur = (ch, epoch)
            self.state = "up"
            self._refused_since = None
            self.up.set()
        self._on_change("up")

    # --- failure ---
    def lost(self, why, epoch: int | None = None) -> None:
        """The link of `epoch` failed (None: the current one). A stale epoch's news is ignored."""
        with self._lock:
            if self._closing or self.state != "up" or (epoch is not None and epoch != self.epoch):
                return
            self.state = "down"
            self.up.clear()
            self.drops += 1
            self.error = why if isinstance(why, str) else f"{type(why).__name__}: {why}"
            self._down_since = time.monotonic()
            for port in self.ports:
                port.cur = None
            chans, self._chans, self._bg = self._chans, [], None
        for ch in chans:
            ch.close()  # receivers see the end and return; a send blocked on a dead link fails
        self.log(f"state paused: link lost ({self.error}); "
                 + ("reconnecting by itself" if self.auto_recover else "waiting for `recover`"))
        self._on_change("down")

    def drop(self) -> None:
        if self.state != "up":
            raise ValueError(f"the link is already {self.state}")
        self.lost("dropped by the drop-link command")

    def request_recover(self) -> None:
        if self.state == "up":
            raise ValueError("the link is up")
        self._recover_asked = True

    def send_ctrl(self, msg: dict) -> None:
        """To the source; remembered and sent again on every recovery."""
        cmd = msg["cmd"]
        if cmd in ("pause", "resume"):
            self.settings.pop("pause", None)
            self.settings.pop("resume", None)
        self.settings[cmd] = msg
        bg = self._bg
        if bg is not None:
            try:
                bg.send_ctrl(msg)
            except OSError as e:
                self.lost(e, self.epoch)

    def check(self, now: float) -> None:
        """Called often by the run: the heartbeat watchdog and the give-up rules."""
        rx = self._bg_rx
        if self.state == "up" and rx is not None and now - rx.last_rx > self.link_timeout:
            self.lost(f"nothing from the source for {self.link_timeout:g} s (no data, no heartbeat)", self.epoch)
        if self.state != "up" and self.fatal is None:
            if now - self._down_since > self.recover_timeout:
                self.fatal = f"the link stayed down for {self.recover_timeout:g} s ({self.error})"
            elif self._refused_since is not None and now - self._refused_since > self.give_up_s:
                self.fatal = (f"the source is gone: {self.dest.addr} refused connections for "
                              f"{now - self._refused_since:.1f} s after the link dropped ({self.error})")

    # --- recovery (the link thread) ---
    def _supervise(self) -> None:
        backoff = BACKOFF_FIRST_S
        next_try = 0.0
        while not self._closing and self.fatal is None:
            time.sleep(0.05)
            if self.state != "down":
                backoff, next_try = BACKOFF_FIRST_S, 0.0
                continue
            now = time.monotonic()
            if self._recover_asked or (self.auto_recover and now >= next_try):
                self._recover_asked = False
                if not self._reconnect():
                    next_try = time.monotonic() + backoff
                    backoff = min(BACKOFF_MAX_S, backoff * 2)
            elif now >= next_try:  # not asked to recover: only watch whether the source lives
                self._note(self.dest.probe())
                next_try = now + PROBE_EVERY_S

    def _note(self, failure) -> None:
        """Track how long the source's address has been refusing connections."""
        refused = failure is not None and (getattr(failure, "errno", None) in _GONE
                                           or "refused" in str(failure) or "No such file" in str(failure))
        if not refused:
            self._refused_since = None
        elif self._refused_since is None:
            self._refused_since = time.monotonic()

    def _reconnect(self) -> bool:
        with self._lock:
            if self.state != "down" or self._closing:
                return True
            self.state = "recovering"
            epoch = self.epoch + 1
            self.epoch = epoch  # even if this attempt fails: stragglers of it are stale
        self._on_change("recovering")
        self.log(f"state recovering: reconnecting to {self.dest.addr} (epoch {epoch})")
        try:
            demand, bg, settings = self.dest.connect(epoch, resume=True)
            bg.send_resume(self._present())
        except HandshakeRefused as e:
            self.fatal = f"the source refused to resume: {e}"
            return False
        except (OSError, ProtocolError) as e:
            with self._lock:
                self.state = "down"
            self._note(e)
            self._on_change("down")
            self.log(f"state paused: reconnecting failed: {getattr(e, 'strerror', None) or e}")
            return False
        self._install(demand, bg, epoch)
        for msg in list(self.settings.values()):
            if isinstance(msg, dict) and "cmd" in msg:
                self.send_ctrl(msg)
        self.recoveries += 1
        self._after_recovery()
        self.log(f"state postcopy: link recovered (epoch {epoch}, recovery {self.recoveries})")
        return True

    def waiting_requests(self, pages: list[int]) -> None:
        """Ask again for pages vCPUs wait on (their requests or replies may be lost)."""
        if pages and self.ports:
            for i in range(0, len(pages), 4096):
                self.ports[0].send_request(pages[i:i + 4096])

    # --- the end ---
    def close(self, stop_source: bool) -> None:
        """Tell the source the migration is complete (it exits), close everything."""
        with self._lock:
            self._closing = True
            bg, chans = self._bg, self._chans
            self._chans, self._bg = [], None
            for port in self.ports:
                port.cur = None
        if stop_source and bg is not None:
            try:
                bg.send_ctrl({"cmd": "stop"})
            except OSError:
                pass
        for ch in chans:
            ch.close()
        if self._thread.is_alive():
            self._thread.join(3)
