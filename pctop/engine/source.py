"""The migration source: a separate process that owns the memory image.

It answers demand requests first: each demand channel has its own server
(a forked process, or a thread when prefetching) that does nothing but turn a
REQ frame into PAGES frames, so a demand reply never waits behind a
background chunk (the same reason QEMU has a separate "postcopy preempt"
channel). The background stream runs on its own channel
and thread: it walks the image in chunks, skips pages already sent on
demand, paces itself to a bandwidth limit (0 = unlimited), and optionally
prefetches the pages after recent demand faults first. Control frames from
the destination arrive on the background channel (pause, resume, bandwidth,
finish = stream everything left now, unlimited).

Run as `python -m pctop.engine.source --npages N --demand-fd FD... --bg-fd FD`;
pctop.engine.run starts it with the socket ends inherited.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import mmap
import os
import select
import signal
import sys
import threading
import time

from pctop.engine.image import PageImage
from pctop.engine.transport import (KIND_BACKGROUND, KIND_DEMAND, KIND_PREFETCH, T_CTRL,
                                    Channel, ProtocolError)

MAX_CHUNK_PAGES = 512  # 2 MiB of 4 KiB pages: the size raw UFFDIO_COPY is fastest at
PACE_SLICE_S = 0.01  # with a limit, send about 10 ms worth per chunk


class Source:
    def __init__(self, image_buf, npages: int, page_size: int, demand: list[Channel], bg: Channel,
                 bandwidth: int = 0, background: bool = True, prefetch: int = 0,
                 demand_cpus: list[int] | None = None):
        self.buf = memoryview(image_buf).cast("B")
        self.npages = npages
        self.page_size = page_size
        self.demand = demand
        self.bg = bg
        self.bandwidth = bandwidth
        self.background = background
        self.paused = False
        self.prefetch = prefetch
        self.demand_cpus = demand_cpus or []
        # 1 = sent once (demand or stream). Shared memory, so that forked demand
        # servers (see run) and the stream see the same bitmap.
        self.sent = mmap.mmap(-1, max(1, npages))
        self._prefetch_q: collections.deque[int] = collections.deque(maxlen=4096)
        self._cursor = 0
        self._done = threading.Event()
        self.stats = {"demand_pages": 0, "background_pages": 0, "prefetch_pages": 0, "requests": 0}

    # --- demand ---
    def serve_demand(self, ch: Channel, index: int = 0) -> None:
        ps = self.page_size
        if index < len(self.demand_cpus) and self.demand_cpus[index] >= 0:
            # Same CPU as the faulting vCPU (which sleeps meanwhile): a same-CPU wake-up
            # costs a tenth of a cross-CPU one here (platform.md).
            os.sched_setaffinity(0, {self.demand_cpus[index]})
        while True:
            pages = ch.recv_requests()
            if pages is None:
                return
            sent, buf = self.sent, self.buf
            if len(pages) == 1:  # the common case: one fault, one page
                p = pages[0]
                sent[p] = 1
                ch.send_pages(KIND_DEMAND, p, 1, buf[p * ps:(p + 1) * ps])
            else:
                for p in pages:
                    sent[p] = 1
                ch.send_page_list(KIND_DEMAND, [(p, 1, buf[p * ps:(p + 1) * ps]) for p in pages])
            if self.prefetch:
                self._prefetch_q.extend(pages)
            self.stats["requests"] += 1
            self.stats["demand_pages"] += len(pages)

    # --- background ---
    def _apply_ctrl(self, msg: dict) -> None:
        cmd = msg.get("cmd")
        if cmd == "pause":
            self.paused = True
        elif cmd == "resume":
            self.paused = False
        elif cmd == "bandwidth":
            self.bandwidth = max(0, int(msg.get("arg", 0)))
        elif cmd == "finish":  # the destination wants everything left, now
            self.background, self.paused, self.bandwidth = True, False, 0
        elif cmd == "stop":
            self._done.set()

    def _poll_ctrl(self, timeout_s: float) -> bool:
        """Apply control frames that arrive within timeout_s; False when the link closed."""
        r, _, _ = select.select([self.bg.sock], [], [], timeout_s)
        while r:
            f = self.bg.recv_frame()
            if f is None:
                return False
            if f.type != T_CTRL:
                raise ProtocolError(f"background channel got frame type {f.type}")
            self._apply_ctrl(self.bg.recv_ctrl(f))
            r, _, _ = select.select([self.bg.sock], [], [], 0)
        return True

    def _unsent_runs(self, lo: int, hi: int):
        """Runs (start, count) of pages in [lo, hi) not yet sent."""
        sent = self.sent
        p = lo
        while p < hi:
            s = sent.find(b"\x00", p, hi)
            if s < 0:
                return
            e = sent.find(b"\x01", s, hi)
            e = hi if e < 0 else e
            yield s, e - s
            p = e

    def _next_runs(self) -> tuple[int, list[tuple[int, int]]]:
        """The next runs to stream: prefetch around recent faults first, then the cursor."""
        while self._prefetch_q:
            p = self._prefetch_q.popleft() + 1
            runs = list(self._unsent_runs(p, min(self.npages, p + self.prefetch)))
            if runs:
                return KIND_PREFETCH, runs
        chunk = MAX_CHUNK_PAGES
        if self.bandwidth:
            chunk = max(1, min(MAX_CHUNK_PAGES, int(self.bandwidth * PACE_SLICE_S) // self.page_size))
        while self._cursor < self.npages:
            lo, hi = self._cursor, min(self.npages, self._cursor + chunk)
            self._cursor = hi
            runs = list(self._unsent_runs(lo, hi))
            if runs:
                return KIND_BACKGROUND, runs
        return 0, []

    def stream(self) -> None:
        ps = self.page_size
        window_t, window_bytes, window_bw = time.monotonic(), 0, self.bandwidth
        ended = False
        while not self._done.is_set():
            if not self._poll_ctrl(0):
                return
            if window_bw != self.bandwidth:
                window_t, window_bytes, window_bw = time.monotonic(), 0, self.bandwidth
            if not self.background or self.paused or ended:
                if not self._poll_ctrl(0.1):
                    return
                if ended and self.background and not self.paused and self.sent.find(b"\x00", 0, self.npages) >= 0:
                    ended, self._cursor = False, 0  # "finish" after the end: resend what demand never took
                continue
            if self.bandwidth:
                due = window_t + window_bytes / self.bandwidth - time.monotonic()
                if due > 0:
                    if not self._poll_ctrl(min(due, 0.05)):
                        return
                    continue
            kind, runs = self._next_runs()
            if not runs:
                self.bg.send_end()
                ended = True
                continue
            for s, n in runs:
                self.sent[s:s + n] = b"\x01" * n
            self.bg.send_page_list(kind, [(s, n, self.buf[s * ps:(s + n) * ps]) for s, n in runs])
            moved = sum(n for _, n in runs)
            window_bytes += moved * ps
            self.stats["prefetch_pages" if kind == KIND_PREFETCH else "background_pages"] += moved

    def run(self, fork_demand: bool = False) -> None:
        """Serve every channel until the destination closes them. fork_demand: each
        demand channel is served by its own forked process instead of a thread, so
        demand servers of different vCPUs never wait for one another's GIL (each
        hand-over between CPUs costs a cross-CPU wake-up). Prefetch hints live in
        this process, so prefetching keeps threads."""
        children = []
        if fork_demand and not self.prefetch and len(self.demand) > 1:
            for i, ch in enumerate(self.demand):
                pid = os.fork()
                if pid == 0:
                    _die_with_parent()
                    self.bg.sock.close()
                    try:
                        self._guard(self.serve_demand, ch, i)
                    finally:
                        os._exit(0)
                children.append(pid)
                ch.sock.close()
        else:
            for i, ch in enumerate(self.demand):
                threading.Thread(target=self._guard, args=(self.serve_demand, ch, i), daemon=True,
                                 name=f"demand{i}").start()
        try:
            self._guard(self.stream)
        finally:
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except OSError:
                    pass

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except (ConnectionResetError, BrokenPipeError):
            self._done.set()  # the destination finished and closed the link
        except (ProtocolError, OSError) as e:
            if not self._done.is_set():
                print(f"pctop engine source: {type(e).__name__}: {e}", file=sys.stderr)
            self._done.set()


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pctop.engine.source")
    ap.add_argument("--npages", type=int, required=True)
    ap.add_argument("--page-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--generation", type=int, default=1)
    ap.add_argument("--demand-fd", type=int, action="append", required=True)
    ap.add_argument("--bg-fd", type=int, required=True)
    ap.add_argument("--bandwidth", type=int, default=0)
    ap.add_argument("--prefetch", type=int, default=0)
    ap.add_argument("--no-background", action="store_true")
    ap.add_argument("--demand-cpus", default="", help="CPU per demand channel, comma-separated, -1 = any")
    a = ap.parse_args(argv)
    _die_with_parent()
    image = PageImage(a.npages, a.page_size, a.seed, a.generation)
    buf = image.build()
    demand = [Channel.from_fd(fd, a.npages, a.page_size) for fd in a.demand_fd]
    bg = Channel.from_fd(a.bg_fd, a.npages, a.page_size)
    bg.send_ctrl({"ready": True})  # the image is built: the destination may start the guest
    cpus = [int(c) for c in a.demand_cpus.split(",") if c]
    Source(buf, a.npages, a.page_size, demand, bg, a.bandwidth, not a.no_background, a.prefetch, cpus).run(
        fork_demand=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
