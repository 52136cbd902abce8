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
latency, background, finish = stream everything left now, unlimited; stop = the
destination has every page).

The source outlives link failures: pctop.engine.link.SourceServer accepts the
destination's channels per epoch and calls attach() / start() / stop_epoch();
the sent-page bitmap, the stream position and the settings carry over, and a
resumed epoch first corrects the bitmap from the destination's RESUME map.

Run as `pctop engine source --listen HOST:PORT` (pctop/cli/engine.py) or
`python -m pctop.engine.page_server --npages N --listen unix:PATH` (what pctop demo starts).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import mmap
import os
import queue
import select
import signal
import sys
import threading
import time

from pctop.engine.image import PageImage
from pctop.engine.transport import KIND_BACKGROUND, KIND_DEMAND, KIND_PREFETCH, T_CTRL, Channel, ProtocolError, config_digest

MAX_CHUNK_PAGES = 512  # 2 MiB of 4 KiB pages: the size raw UFFDIO_COPY is fastest at
PACE_SLICE_S = 0.01  # with a limit, send about 10 ms worth per chunk
HEARTBEAT_S = 0.5  # a PING when the background channel was quiet this long


class PageServer:
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
        # Injected demand-reply latency (us), shared with forked demand servers likewise.
        self._shared = mmap.mmap(-1, 8)
        self._latency = ctypes.c_uint64.from_buffer(self._shared)
        self._prefetch_q: collections.deque[int] = collections.deque(maxlen=4096)
        self._cursor = 0
        self._done = threading.Event()
        self.finished = False  # the destination said it has every page
        self._stream_thread: threading.Thread | None = None
        self._demand_threads: list[threading.Thread] = []
        self._children: list[int] = []
        self.stats = {"demand_pages": 0, "background_pages": 0, "prefetch_pages": 0, "requests": 0}

    @property
    def latency_us(self) -> int:
        return self._latency.value

    @latency_us.setter
    def latency_us(self, us: int) -> None:
        self._latency.value = max(0, int(us))

    # --- epochs (link.SourceServer) ---
    def attach(self, demand: list[Channel], bg: Channel) -> None:
        """New channels after a (re)connection; everything else carries over."""
        self.demand, self.bg = demand, bg
        self._done = threading.Event()

    def apply_resume(self, present: bytearray) -> int:
        """The destination's map of the pages it holds: exactly the others are unsent
        (pages lost in flight go again). The stream moves back to the first unsent page
        only if that lies behind it. Returns how many pages the destination lacks."""
        self.sent[:self.npages] = bytes(present)
        first = self.sent.find(b"\x00", 0, self.npages)
        if 0 <= first < self._cursor:
            self._cursor = first
        return self.npages - bytes(present).count(1)

    # --- demand ---
    def serve_demand(self, ch: Channel, index: int = 0) -> None:
        if index < len(self.demand_cpus) and self.demand_cpus[index] >= 0:
            # Same CPU as the faulting vCPU (which sleeps meanwhile): a same-CPU wake-up
            # costs a tenth of a cross-CPU one on the project's test VMs.
            os.sched_setaffinity(0, {self.demand_cpus[index]})
        delayed: queue.SimpleQueue | None = None
        try:
            while (pages := ch.recv_requests()) is not None:
                lat = self._latency.value
                if lat:
                    # Injected latency, like a longer wire: each reply leaves `lat` after its
                    # request arrived, and requests behind it are not held up meanwhile.
                    if delayed is None:
                        delayed = queue.SimpleQueue()
                        threading.Thread(target=self._guard, args=(self._send_delayed, ch, delayed),
                                         daemon=True, name="demand-delay").start()
                    delayed.put((time.monotonic() + lat / 1e6, pages))
                else:
                    self._reply(ch, pages)
        finally:
            if delayed is not None:
                delayed.put(None)  # the delay thread ends with this channel

    def _send_delayed(self, ch: Channel, delayed: queue.SimpleQueue) -> None:
        _fine_timer_slack()
        while (item := delayed.get()) is not None:
            due, pages = item
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._reply(ch, pages)

    def _reply(self, ch: Channel, pages) -> None:
        ps, sent, buf = self.page_size, self.sent, self.buf
        if self.prefetch:  # queued before the reply leaves: the stream may look any moment after
            self._prefetch_q.extend(pages)
        if len(pages) == 1:  # the common case: one fault, one page
            p = pages[0]
            sent[p] = 1
            ch.send_pages(KIND_DEMAND, p, 1, buf[p * ps:(p + 1) * ps])
        else:
            for p in pages:
                sent[p] = 1
            ch.send_page_list(KIND_DEMAND, [(p, 1, buf[p * ps:(p + 1) * ps]) for p in pages])
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
        elif cmd == "latency":
            self.latency_us = int(msg.get("arg", 0))
        elif cmd == "background":
            self.background = bool(msg.get("arg"))
        elif cmd == "finish":  # the destination wants everything left, now
            self.background, self.paused, self.bandwidth = True, False, 0
        elif cmd == "stop":  # the destination has every page: the migration is complete
            self.finished = True
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
        """Runs (start, count) of pages in [lo, hi) not yet sent, each of at least one page."""
        sent = self.sent
        p = lo
        while p < hi:
            s = sent.find(b"\x00", p, hi)
            if s < 0:
                return
            e = sent.find(b"\x01", s, hi)
            e = hi if e < 0 else e
            if e > s:  # a demand thread may have sent page s between the two finds
                yield s, e - s
            p = max(e, s + 1)

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
        last_sent = time.monotonic()
        while not self._done.is_set():
            if not self._poll_ctrl(0):
                return
            if time.monotonic() - last_sent > HEARTBEAT_S:
                # The destination's only way to notice a silently dead link.
                self.bg.send_ping()
                last_sent = time.monotonic()
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
            last_sent = time.monotonic()
            moved = sum(n for _, n in runs)
            window_bytes += moved * ps
            self.stats["prefetch_pages" if kind == KIND_PREFETCH else "background_pages"] += moved

    def run(self, fork_demand: bool = False) -> None:
        """Serve every channel until the destination closes them (one epoch)."""
        self.start(fork_demand)
        self._stream_thread.join()
        self.stop_epoch()

    def start(self, fork_demand: bool = False) -> None:
        """Start serving the attached channels. fork_demand: each demand channel is
        served by its own forked process instead of a thread, so demand servers of
        different vCPUs never wait for one another's GIL (each hand-over between CPUs
        costs a cross-CPU wake-up). Prefetch hints live in this process, so
        prefetching keeps threads. Call from the thread that owns the process (fork)."""
        self._children, self._demand_threads = [], []
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
                self._children.append(pid)
                ch.sock.close()
        else:
            for i, ch in enumerate(self.demand):
                t = threading.Thread(target=self._guard, args=(self.serve_demand, ch, i), daemon=True,
                                     name=f"demand{i}")
                t.start()
                self._demand_threads.append(t)
        self._stream_thread = threading.Thread(target=self._guard, args=(self.stream,), daemon=True,
                                               name="stream")
        self._stream_thread.start()

    def active(self) -> bool:
        """The epoch is being served (its stream has not ended)."""
        return self._stream_thread is not None and self._stream_thread.is_alive()

    def stop_epoch(self) -> None:
        """End the current epoch: shut its sockets (a send blocked on a dead link
        returns), wait for its threads, end its forked servers."""
        self._done.set()
        for ch in list(self.demand) + [self.bg]:
            if ch is not None and ch.sock.fileno() >= 0:
                ch.close()
        if self._stream_thread is not None:
            self._stream_thread.join(5)
        for t in self._demand_threads:
            t.join(5)
        for pid in self._children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
        self._children, self._demand_threads = [], []

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except (ConnectionResetError, BrokenPipeError):
            self._done.set()  # the destination finished and closed the link
        except (ProtocolError, OSError) as e:
            if not self._done.is_set():
                print(f"pctop engine source: {type(e).__name__}: {e}", file=sys.stderr)
            self._done.set()


def _fine_timer_slack() -> None:
    """1 us timer slack for the calling thread (default 50 us): injected delays of
    100 us should not become 150."""
    PR_SET_TIMERSLACK = 29
    ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1000)


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def serve_source(addr, npages: int, seed: int = 1, page_size: int = 4096, generation: int = 1,
                 bandwidth: int = 0, background: bool = True, prefetch: int = 0, token: bytes | None = None,
                 wait_s: float = 60.0, demand_cpus: list[int] | None = None, on_listening=None,
                 quiet: bool = False) -> int:
    """Build the image, listen at addr, serve one destination across link failures.
    Exit status: 0 the destination has every page, 1 it never came (back)."""
    from pctop.engine.link import SourceServer, bound_address, listen_socket

    image = PageImage(npages, page_size, seed, generation)
    buf = image.build()
    listener = listen_socket(addr)
    try:
        if on_listening:
            on_listening(bound_address(listener, addr))
        src = PageServer(buf, npages, page_size, [], None, bandwidth, background, prefetch, demand_cpus)
        server = SourceServer(src, listener, config_digest(npages, page_size, seed, generation), token, wait_s,
                              quiet=quiet)
        return server.serve()
    finally:
        listener.close()
        if addr.kind == "unix":
            try:
                os.unlink(addr.path)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    """The source as pctop.engine.run starts it: a child that dies with its parent and
    says on stdout when it listens."""
    from pctop.engine.link import parse_address

    ap = argparse.ArgumentParser(prog="python -m pctop.engine.page_server")
    ap.add_argument("--npages", type=int, required=True)
    ap.add_argument("--page-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--bandwidth", type=int, default=0)
    ap.add_argument("--prefetch", type=int, default=0)
    ap.add_argument("--no-background", action="store_true")
    ap.add_argument("--wait", type=float, default=60.0)
    ap.add_argument("--demand-cpus", default="", help="CPU per demand channel, comma-separated, -1 = any")
    a = ap.parse_args(argv)
    _die_with_parent()
    # Ctrl+C and a closed terminal reach the whole process group: the parent (the
    # destination) decides, tears down and closes the link, which ends this process;
    # if the parent dies instead, PR_SET_PDEATHSIG does.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    cpus = [int(c) for c in a.demand_cpus.split(",") if c]

    def announce(bound) -> None:
        print(json.dumps({"type": "listening", "address": str(bound)}), flush=True)
    try:
        return serve_source(parse_address(a.listen), a.npages, a.seed, a.page_size, bandwidth=a.bandwidth,
                            background=not a.no_background, prefetch=a.prefetch, wait_s=a.wait,
                            demand_cpus=cpus, on_listening=announce, quiet=True)
    except MemoryError:
        print(f"pctop engine source: error: cannot hold a {a.npages * a.page_size >> 20} MiB image in memory",
              file=sys.stderr)
        return 1
    except OSError as e:  # e.g. a unix socket path longer than the kernel takes (108 bytes)
        print(f"pctop engine source: error: cannot listen on {a.listen}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
