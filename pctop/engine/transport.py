"""The link between source and destination: length-prefixed frames over a stream socket.

One interface for any stream socket (a unix socketpair between two local
processes now, TCP across hosts later). Each frame is a fixed 24-byte header

    type u8 | kind u8 | reserved u16 | count u32 | start u64 | payload length u64

followed by `payload length` bytes:
  REQ   dest -> source   count u32 page numbers the destination needs now
  PAGES source -> dest   `count` pages starting at page `start`, raw page bytes;
                         kind says why they were sent (demand, background, prefetch)
  CTRL  both ways        a JSON object (pause, resume, bandwidth, latency, finish, stop; ready)
  END   source -> dest   the background stream has sent every page
  PING  source -> dest   heartbeat: the background channel was quiet for a while
  RESUME dest -> source  the pages the destination holds (1 bit each), first frame of a
                         resumed epoch (after a link failure)

Every connection starts with the versioned handshake at the end of this module;
docs/protocol.md describes the whole protocol.

Page numbers and sizes are checked against the region and the limits below
before anything is written: a frame that names a page outside it, or is larger
than allowed, is a ProtocolError, never a write. A link that closes inside a
frame is LinkClosed (a link failure, recoverable), not a protocol violation.

Payloads are received straight into a caller's buffer (recv_into with
MSG_WAITALL), so the destination can UFFDIO_COPY from that buffer without a
Python object per page.
"""

from __future__ import annotations

import array
import hashlib
import hmac
import json
import secrets
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

FRAME = struct.Struct("<BBHIQQ")
FRAME_SIZE = FRAME.size  # 24

T_REQ, T_PAGES, T_CTRL, T_END, T_PING, T_RESUME = 1, 2, 3, 4, 5, 6
KIND_DEMAND, KIND_BACKGROUND, KIND_PREFETCH = 1, 2, 3
KIND_NAMES = {KIND_DEMAND: "demand", KIND_BACKGROUND: "background", KIND_PREFETCH: "prefetch"}
MAX_REQ_PAGES = 1 << 16
MAX_PAGES_BYTES = 2 << 20  # one PAGES frame: the stream's largest chunk
MAX_CTRL_BYTES = 1 << 16
SOCK_BUF = 4 << 20
_SO_SNDBUFFORCE, _SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h


class ProtocolError(Exception):
    """The peer sent something this end must not act on."""


class LinkClosed(ProtocolError):
    """The link closed in the middle of a frame or handshake: a link failure."""


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

    def send_ping(self) -> None:
        self._send([FRAME.pack(T_PING, 0, 0, 0, 0, 0)])

    def send_resume(self, present) -> None:
        """The pages this end holds (present[p] != 0), one bit each, LSB first."""
        bits = pack_bits(present, self.npages)
        self._send([FRAME.pack(T_RESUME, 0, 0, 0, 0, len(bits)) + bits])

    def recv_resume(self, f: Frame) -> bytearray:
        raw = bytearray(f.length)
        self.recv_payload_into(memoryview(raw), f.length)
        return unpack_bits(raw, self.npages)

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
            if f.length > MAX_PAGES_BYTES:
                raise ProtocolError(f"PAGES frame of {f.length} bytes (at most {MAX_PAGES_BYTES})")
        elif f.type == T_REQ:
            if f.length != 4 * f.count or f.count > MAX_REQ_PAGES:
                raise ProtocolError(f"REQ frame: {f.count} pages in {f.length} bytes")
        elif f.type == T_CTRL:
            if f.length > MAX_CTRL_BYTES:
                raise ProtocolError(f"CTRL frame of {f.length} bytes (at most {MAX_CTRL_BYTES})")
        elif f.type == T_RESUME:
            if f.length != (self.npages + 7) // 8:
                raise ProtocolError(f"RESUME frame of {f.length} bytes for {self.npages} pages")
        elif f.type not in (T_END, T_PING) or f.length:
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
            raise LinkClosed("link closed inside a frame")
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
            raise LinkClosed("link closed inside a frame")

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
                    raise LinkClosed("link closed inside a frame")
                return False
            got += n
        return True


_BITS_TO_BYTES = [bytes((b >> i) & 1 for i in range(8)) for b in range(256)]
_BYTES_TO_BITS = {v: i for i, v in enumerate(_BITS_TO_BYTES)}


def pack_bits(present, npages: int) -> bytes:
    """present (a 0/1 byte per page) -> 1 bit per page, LSB first."""
    flags = bytes(present[:npages]).translate(bytes([0] + [1] * 255))
    flags += bytes(-len(flags) % 8)
    return bytes(_BYTES_TO_BITS[flags[i:i + 8]] for i in range(0, len(flags), 8))


def unpack_bits(bits, npages: int) -> bytearray:
    return bytearray(b"".join(_BITS_TO_BYTES[b] for b in bits)[:npages])


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


# --- handshake (one per connection, before any frame; docs/protocol.md) ---
#
# Each side sends greetings: a fixed 16-byte prologue that never changes between
# versions (so any version can read another's and say what is wrong)
#     magic b"PCTOPMIG" | version u16 | flags u16 (0) | body length u32
# and a JSON object body of at most MAX_GREETING bytes.
#   1. source -> dest  {"role": "source", "page_size", "npages", "config", "auth": bool, "nonce"}
#   2. dest -> source  {"role": "dest", "channel": "bg"|"demand"|"probe", "index", "channels",
#                       "session", "epoch", "resume", "page_size", "npages", "config", "auth"}
#                      or {"refuse": why} when step 1 was unacceptable
#   3. source -> dest  {"ok": true, "bandwidth", "background", "prefetch", "latency_us"}
#                      or {"ok": false, "error": why}
# "config" is config_digest(): both ends must have built the same run.
# "auth" (step 2) is HMAC-SHA256(token, nonce + session) when the source needs a token.

MAGIC = b"PCTOPMIG"
PROTOCOL_VERSION = 1
GREETING = struct.Struct("<8sHHI")
MAX_GREETING = 4096
HANDSHAKE_TIMEOUT_S = 5.0


class HandshakeRefused(ProtocolError):
    """One end refused the other (version, configuration, token): never retried."""


def config_digest(npages: int, page_size: int, seed: int, generation: int) -> str:
    """What both ends must agree on for the pages to mean the same thing."""
    canon = json.dumps({"npages": npages, "page_size": page_size, "seed": seed,
                        "generation": generation}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


def auth_code(token: bytes, nonce: str, session: str) -> str:
    return hmac.new(token, f"pctop-engine|{nonce}|{session}".encode(), hashlib.sha256).hexdigest()


def send_greeting(sock: socket.socket, body: dict, version: int = PROTOCOL_VERSION) -> None:
    raw = json.dumps(body).encode()
    sock.sendall(GREETING.pack(MAGIC, version, 0, len(raw)) + raw)


def recv_greeting(sock: socket.socket) -> tuple[int, dict]:
    """(version, body) of the peer's next greeting; ProtocolError when it is not one."""
    head = _recv_all(sock, GREETING.size)
    magic, version, _flags, length = GREETING.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"the peer is not a pctop engine (magic {magic!r})")
    if length > MAX_GREETING:
        raise ProtocolError(f"greeting of {length} bytes (at most {MAX_GREETING})")
    try:
        body = json.loads(_recv_all(sock, length))
    except ValueError as e:
        raise ProtocolError(f"greeting is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("greeting is not a JSON object")
    return version, body


def _recv_all(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise LinkClosed("the peer closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def _version_problem(peer: str, version: int) -> str | None:
    if version != PROTOCOL_VERSION:
        return (f"protocol version mismatch: the {peer} speaks version {version}, "
                f"this end speaks version {PROTOCOL_VERSION}")
    return None


def _config_problem(mine: tuple[int, int, str], body: dict, peer: str) -> str | None:
    theirs = (body.get("npages"), body.get("page_size"), body.get("config"))
    if theirs == mine:
        return None
    return (f"configuration mismatch: the {peer} has {theirs[0]} pages of {theirs[1]} bytes "
            f"(config {theirs[2]}), this end {mine[0]} pages of {mine[1]} bytes (config {mine[2]}); "
            "memory, page size and seed must be the same on both ends")


def dest_handshake(sock: socket.socket, *, npages: int, page_size: int, config: str, channel: str,
                   index: int, channels: int, session: str, epoch: int, resume: bool,
                   token: bytes | None) -> dict:
    """The destination's side; returns the source's settings (step 3).
    HandshakeRefused when either end refuses, ProtocolError/OSError when the link fails."""
    version, hello = recv_greeting(sock)
    why = _version_problem("source", version) or _config_problem((npages, page_size, config), hello, "source")
    if not why and hello.get("auth") and not token:
        why = ("the source requires a token: put it in a file given with --token-file, "
               "or in the PCTOP_ENGINE_TOKEN environment variable")
    if why:
        send_greeting(sock, {"refuse": why})
        raise HandshakeRefused(why)
    auth = auth_code(token, str(hello.get("nonce", "")), session) if hello.get("auth") else ""
    send_greeting(sock, {"role": "dest", "channel": channel, "index": index, "channels": channels,
                         "session": session, "epoch": epoch, "resume": resume, "npages": npages,
                         "page_size": page_size, "config": config, "auth": auth})
    version, reply = recv_greeting(sock)
    if not reply.get("ok"):
        raise HandshakeRefused(f"the source refused: {reply.get('error', 'no reason given')}")
    return reply


def source_handshake(sock: socket.socket, *, npages: int, page_size: int, config: str,
                     token: bytes | None, settings: Callable[[], dict],
                     check: Callable[[dict], str | None] | None = None) -> dict:
    """The source's side; returns the destination's hello (step 2).
    HandshakeRefused (after telling the destination why) when it is unacceptable."""
    nonce = secrets.token_hex(16)
    send_greeting(sock, {"role": "source", "npages": npages, "page_size": page_size, "config": config,
                         "auth": token is not None, "nonce": nonce})
    version, hello = recv_greeting(sock)
    if "refuse" in hello:
        raise HandshakeRefused(f"the destination refused: {hello['refuse']}")
    why = _version_problem("destination", version) or \
        _config_problem((npages, page_size, config), hello, "destination")
    if not why and token is not None and not hmac.compare_digest(
            str(hello.get("auth", "")), auth_code(token, nonce, str(hello.get("session", "")))):
        why = "wrong or missing token"
    if not why and (hello.get("channel") not in ("bg", "demand", "probe")
                    or not isinstance(hello.get("index"), int) or not isinstance(hello.get("channels"), int)
                    or not isinstance(hello.get("epoch"), int) or not isinstance(hello.get("session"), str)
                    or not 0 <= hello["index"] < max(1, hello["channels"]) <= 1024):
        why = "malformed hello (channel, index, channels, epoch, session)"
    if not why and check is not None:
        why = check(hello)
    if why:
        send_greeting(sock, {"ok": False, "error": why})
        raise HandshakeRefused(why)
    send_greeting(sock, dict(settings(), ok=True))
    return hello
