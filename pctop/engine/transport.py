"""The link between source and destination: length-prefixed frames over a stream socket.

One interface for any stream socket (a unix socketpair between two local
processes now, TCP across hosts later). Each frame is a fixed 24-byte header

    type u8 | kind u8 | reserved u16 | count u32 | start u64 | payload length u64

followed by `payload length` bytes:
  REQ   dest -> source   count u32 page numbers the destination needs now
  PAGES source -> dest   `count` pages starting at page `start`, raw page bytes;
                         kind says why they were sent (demand, background, prefetch)
  CTRL  dest -> source   a JSON object (pause, resume, bandwidth, finish)
  END   source -> dest   the background stream has sent every page

Page numbers are checked against the region before anything is written:
a frame that names a page outside it is a ProtocolError, never a write.

Payloads are received straight into a caller's buffer (recv_into with
MSG_WAITALL), so the destination can UFFDIO_COPY from that buffer without a
Python object per page.
"""

from __future__ import annotations

import array
import json
import socket
import struct
import threading
from typing import Any, NamedTuple

FRAME = struct.Struct("<BBHIQQ")
FRAME_SIZE = FRAME.size  # 24

T_REQ, T_PAGES, T_CTRL, T_END = 1, 2, 3, 4
KIND_DEMAND, KIND_BACKGROUND, KIND_PREFETCH = 1, 2, 3
KIND_NAMES = {KIND_DEMAND: "demand", KIND_BACKGROUND: "background", KIND_PREFETCH: "prefetch"}
MAX_REQ_PAGES = 1 << 16
SOCK_BUF = 4 << 20
_SO_SNDBUFFORCE, _SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h


class ProtocolError(Exception):
    """The peer sent something this end must not act on."""


class Frame(NamedTuple):
    type: int
    kind: int
    count: int
    start: int
    length: int


class Channel:
    """One framed, bidirectional stream. Sends are serialised by a lock (several
    reader threads may request on one channel); receiving is for one thread."""

    def __init__(self, sock: socket.socket, npages: int, page_size: int):
        self.sock = sock
        self.npages = npages
        self.page_size = page_size
        self._send_lock = threading.Lock()
        for force, opt in ((_SO_SNDBUFFORCE, socket.SO_SNDBUF), (_SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:  # root may exceed net.core.[rw]mem_max: fewer wake-ups per 2 MiB chunk
                sock.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)
            except OSError:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
                except OSError:
                    pass  # a smaller buffer only costs throughput
        self._hdr = bytearray(FRAME_SIZE)
        self._hdr_view = memoryview(self._hdr)
        self._rbuf = bytearray()  # buffered bytes of REQ frames not yet parsed

    @classmethod
    def from_fd(cls, fd: int, npages: int, page_size: int) -> "Channel":
        return cls(socket.socket(fileno=fd), npages, page_size)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    # --- sending ---
    def _send(self, parts: list) -> None:
        with self._send_lock:
            if len(parts) == 1:
                self.sock.sendall(parts[0])
                return
            # One sendmsg nearly always takes everything; finish by hand if it did not.
            sent = self.sock.sendmsg(parts)
            if sent < sum(len(p) for p in parts):
                _sendmsg_rest(self.sock, parts, sent)

    def send_request(self, pages) -> None:
        n = len(pages)
        self._send([FRAME.pack(T_REQ, 0, 0, n, 0, 4 * n) + struct.pack(f"<{n}I", *pages)])

    def send_pages(self, kind: int, start: int, count: int, data) -> None:
        self._send([FRAME.pack(T_PAGES, kind, 0, count, start, count * self.page_size), data])

    def send_page_list(self, kind: int, runs: list[tuple[int, int, Any]]) -> None:
        """Several (start, count, data) runs in one sendmsg."""
        parts: list = []
        for start, count, data in runs:
            parts.append(FRAME.pack(T_PAGES, kind, 0, count, start, count * self.page_size))
            parts.append(data)
        self._send(parts)

    def send_ctrl(self, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self._send([FRAME.pack(T_CTRL, 0, 0, 0, 0, len(body)) + body])

    def send_end(self) -> None:
        self._send([FRAME.pack(T_END, 0, 0, 0, 0, 0)])

    # --- receiving ---
    def recv_frame(self) -> Frame | None:
        """The next frame header, checked; None when the peer closed the link."""
        if not self._recv_exact(memoryview(self._hdr), FRAME_SIZE):
            return None
        f = Frame(*(FRAME.unpack(self._hdr)[i] for i in (0, 1, 3, 4, 5)))
        if f.type == T_PAGES:
            if f.kind not in KIND_NAMES:
                raise ProtocolError(f"PAGES frame of unknown kind {f.kind}")
            self.check_pages(f.start, f.count)
            if f.length != f.count * self.page_size:
                raise ProtocolError(f"PAGES frame: {f.count} pages but {f.length} bytes")
        elif f.type == T_REQ:
            if f.length != 4 * f.count or f.count > MAX_REQ_PAGES:
                raise ProtocolError(f"REQ frame: {f.count} pages in {f.length} bytes")
        elif f.type == T_CTRL:
            if f.length > 1 << 16:
                raise ProtocolError(f"CTRL frame of {f.length} bytes")
        elif f.type != T_END or f.length:
            raise ProtocolError(f"unknown frame type {f.type} ({f.length} bytes)")
        return f

    def recv_demand_page(self, page_view: memoryview) -> Frame | None:
        """Receive one single-page PAGES frame (all a demand channel carries) with one
        recvmsg: header and page land in their buffers together. None at EOF."""
        ps = self.page_size
        n = self.sock.recvmsg_into([self._hdr_view, page_view[:ps]], 0, socket.MSG_WAITALL)[0]
        if n == 0:
            return None
        if n < FRAME_SIZE and not self._recv_exact(self._hdr_view[n:], FRAME_SIZE - n):
            raise ProtocolError("link closed inside a frame")
        t, kind, _, count, start, length = FRAME.unpack(self._hdr)
        if t != T_PAGES or count != 1 or length != ps:
            raise ProtocolError(f"demand channel: expected one page, got frame type {t} with {count} pages")
        self.check_pages(start, 1)
        if kind not in KIND_NAMES:
            raise ProtocolError(f"PAGES frame of unknown kind {kind}")
        got = max(0, n - FRAME_SIZE)
        if got < ps:
            self.recv_payload_into(page_view[got:], ps - got)
        return Frame(t, kind, 1, start, ps)

    def recv_requests(self) -> array.array | None:
        """Page numbers of every complete REQ frame available, reading as many as one
        recv() brings (a reader may have sent several); blocks for at least one. None at EOF."""
        pages = array.array("I")
        buf = self._rbuf
        while True:
            off = 0
            while len(buf) - off >= FRAME_SIZE:
                t, _, _, count, _, length = FRAME.unpack_from(buf, off)
                if t != T_REQ or length != 4 * count or count > MAX_REQ_PAGES:
                    raise ProtocolError(f"demand channel: bad request frame (type {t}, {count} pages)")
                if len(buf) - off < FRAME_SIZE + length:
                    break
                pages.frombytes(buf[off + FRAME_SIZE:off + FRAME_SIZE + length])
                off += FRAME_SIZE + length
            del buf[:off]
            if pages:
                for p in pages:
                    if p >= self.npages:
                        raise ProtocolError(f"request for page {p} outside the region of {self.npages} pages")
                return pages
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            buf += data

    def recv_payload_into(self, buf: memoryview, length: int) -> None:
        if not self._recv_exact(buf, length):
            raise ProtocolError("link closed inside a frame")

    def recv_ctrl(self, f: Frame) -> dict:
        raw = bytearray(f.length)
        self.recv_payload_into(memoryview(raw), f.length)
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise ProtocolError(f"CTRL frame is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ProtocolError("CTRL frame is not a JSON object")
        return obj

    def check_pages(self, start: int, count: int) -> None:
        if count <= 0 or start + count > self.npages:
            raise ProtocolError(f"pages {start}+{count} outside the region of {self.npages} pages")

    def _recv_exact(self, buf: memoryview, length: int) -> bool:
        got = 0
        while got < length:
            n = self.sock.recv_into(buf[got:length], length - got, socket.MSG_WAITALL)
            if n == 0:
                if got:
                    raise ProtocolError("link closed inside a frame")
                return False
            got += n
        return True


def _sendmsg_rest(sock: socket.socket, parts: list, sent: int) -> None:
    """Finish a sendmsg that took only `sent` bytes of parts."""
    views = [memoryview(p).cast("B") for p in parts]
    while True:
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if not views:
            return
        if sent:
            views[0] = views[0][sent:]
        sent = sock.sendmsg(views)
