"""Connections between the source and the destination: addresses, tokens, listening,
connecting, and the source's accept loop that survives link failures.

Addresses are `HOST:PORT` (TCP; `[v6addr]:PORT` for IPv6) or `unix:PATH`.
Listening binds 127.0.0.1 unless told otherwise; any address that is not
loopback (or a unix socket) needs a shared token, read from a file
(`--token-file`) or the PCTOP_ENGINE_TOKEN environment variable, never from
the command line (other users can read command lines in /proc).

A migration is a *session* (a random id the destination picks) made of
*epochs*: each (re)connection of the destination opens all its channels
again, with the next epoch number. The source keeps its state (which pages it
sent, the stream's position, settings) across epochs, so a recovered link
resumes the stream where it stopped; on a resumed epoch the destination first
sends the map of pages it holds (a RESUME frame), so pages lost in flight are
sent again and nothing it holds is.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import select
import socket
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

from pctop.engine.transport import (
    HANDSHAKE_TIMEOUT_S,
    T_RESUME,
    Channel,
    HandshakeRefused,
    ProtocolError,
    dest_handshake,
    source_handshake,
)

TOKEN_ENV = "PCTOP_ENGINE_TOKEN"
DEFAULT_HOST = "127.0.0.1"


class LinkError(Exception):
    """Bad address or token set-up: a one-line message for the user."""


class Address(NamedTuple):
    kind: str  # "tcp" | "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, default_host: str = DEFAULT_HOST) -> Address:
    """`HOST:PORT`, `:PORT` (default host), `[v6]:PORT` or `unix:PATH`."""
    if text.startswith("unix:"):
        if not text[5:]:
            raise LinkError("unix: address needs a path")
        return Address("unix", path=text[5:])
    host, sep, port = text.rpartition(":")
    if not sep:
        raise LinkError(f"address {text!r}: expected HOST:PORT or unix:PATH")
    host = host.strip("[]") or default_host
    try:
        p = int(port)
    except ValueError:
        raise LinkError(f"address {text!r}: port {port!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise LinkError(f"address {text!r}: port out of range")
    return Address("tcp", host, p)


def is_local(addr: Address) -> bool:
    """True for unix sockets and loopback addresses (no token needed to listen there)."""
    if addr.kind == "unix":
        return True
    if addr.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr.host).is_loopback
    except ValueError:
        return False


def load_token(token_file: str | None) -> bytes | None:
    """The shared token from a file or the environment; None when neither is set."""
    if token_file:
        try:
            with open(token_file, "rb") as f:
                tok = f.read().strip()
        except OSError as e:
            raise LinkError(f"cannot read token file {token_file}: {e.strerror}") from None
        if not tok:
            raise LinkError(f"token file {token_file} is empty")
        return tok
    env = os.environ.get(TOKEN_ENV, "").strip()
    return env.encode() if env else None


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # A demand request is a few bytes: Nagle would hold it for the previous reply's ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def listen_socket(addr: Address) -> socket.socket:
    if addr.kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(addr.path):
            os.unlink(addr.path)
        old = os.umask(0o177)
        try:
            s.bind(addr.path)
        finally:
            os.umask(old)
    else:
        fam = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr.host, addr.port))
    s.listen(64)
    return s


def bound_address(sock: socket.socket, addr: Address) -> Address:
    """The address actually bound (port 0 picks a free port)."""
    if addr.kind == "unix":
        return addr
    return Address("tcp", addr.host, sock.getsockname()[1])


def connect_socket(addr: Address, timeout: float) -> socket.socket:
    if addr.kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = addr.path
    else:
        s = socket.socket(socket.AF_INET6 if ":" in addr.host else socket.AF_INET, socket.SOCK_STREAM)
        target = (addr.host, addr.port)
    s.settimeout(timeout)
    try:
        s.connect(target)
    except BaseException:
        s.close()
        raise
    _tune(s)
    return s


class DestLink:
    """The destination's end: opens every channel of one epoch, with the handshake."""

    def __init__(self, addr: Address, token: bytes | None, npages: int, page_size: int, config: str,
                 demand_channels: int):
        self.addr = addr
        self.token = token
        self.npages, self.page_size, self.config = npages, page_size, config
        self.demand_channels = demand_channels
        self.session = secrets.token_hex(8)

    def _open(self, channel: str, index: int, epoch: int, resume: bool, timeout: float) -> tuple[Channel, dict]:
        s = connect_socket(self.addr, timeout)
        try:
            s.settimeout(max(timeout, HANDSHAKE_TIMEOUT_S))
            settings = dest_handshake(s, npages=self.npages, page_size=self.page_size, config=self.config,
                                      channel=channel, index=index, channels=self.demand_channels,
                                      session=self.session, epoch=epoch, resume=resume, token=self.token)
            s.settimeout(None)
        except BaseException:
            s.close()
            raise
        return Channel(s, self.npages, self.page_size), settings

    def connect(self, epoch: int, resume: bool, timeout: float = 2.0) -> tuple[list[Channel], Channel, dict]:
        """(demand channels, background channel, the source's settings). HandshakeRefused
        is final; OSError / ProtocolError mean "try again later"."""
        opened: list[Channel] = []
        try:
            for i in range(self.demand_channels):
                ch, _ = self._open("demand", i, epoch, resume, timeout)
                opened.append(ch)
            # The background channel last: it completes the epoch at the source.
            bg, settings = self._open("bg", 0, epoch, resume, timeout)
            return opened, bg, settings
        except BaseException:
            for ch in opened:
                ch.close()
            raise

    def probe(self, timeout: float = 1.0) -> str | None:
        """None when a source answers at the address, else why not (e.g. connection refused)."""
        try:
            ch, _ = self._open("probe", 0, 0, False, timeout)
        except HandshakeRefused as e:
            return str(e)
        except (OSError, ProtocolError) as e:
            return getattr(e, "strerror", None) or str(e) or type(e).__name__
        ch.close()
        return None


class SourceServer:
    """The source's accept loop: one destination session, any number of epochs.

    `source` is a pctop.engine.page_server.PageServer; per complete epoch the server calls
    source.attach(demand, bg) and source.start(); a newer epoch stops the older one
    first (its sockets are shut down, which ends sends blocked on a dead link)."""

    def __init__(self, source, listener: socket.socket, config: str, token: bytes | None,
                 wait_s: float = 30.0, fork_demand: bool = True, log: Callable[[str], None] | None = None,
                 quiet: bool = False):
        self.source = source
        self.listener = listener
        self.config = config
        self.token = token
        self.wait_s = wait_s
        self.fork_demand = fork_demand
        self.log = log or (lambda m: print(f"pctop engine source: {m}", file=sys.stderr, flush=True))
        self.info = (lambda m: None) if quiet else self.log  # progress, not problems
        self.session: str | None = None
        self.epoch = 0  # the running epoch (0: none yet)
        self._pending: dict[int, dict[tuple[str, int], Channel]] = {}
        self._want: dict[int, int] = {}  # epoch -> demand channels it has
        self._resume: dict[int, bool] = {}  # epoch -> a resumed epoch (a RESUME frame comes first)

    def _settings(self) -> dict:
        s = self.source
        return {"bandwidth": s.bandwidth, "background": s.background, "prefetch": s.prefetch,
                "latency_us": s.latency_us}

    def _check_session(self, hello: dict) -> str | None:
        if hello.get("channel") == "probe" or self.session in (None, hello.get("session")):
            return None
        return "this source is serving another destination (a different session)"

    def serve(self) -> int:
        """Until the destination says the migration is complete (0), or it has been
        gone for wait_s (1)."""
        lost_at = time.monotonic()
        running = False
        while True:
            if self.source.finished:
                self.source.stop_epoch()
                self.info("state completed: the destination has every page")
                return 0
            if running and not self.source.active():
                self.source.stop_epoch()
                running = False
                lost_at = time.monotonic()
                self.info(f"state paused: link lost (epoch {self.epoch}); "
                         f"waiting up to {self.wait_s:.0f} s for the destination to reconnect")
            if not running and time.monotonic() - lost_at > self.wait_s:
                what = "connect" if self.epoch == 0 else "reconnect"
                self.log(f"state failed: the destination did not {what} within {self.wait_s:.0f} s")
                return 1
            r, _, _ = select.select([self.listener], [], [], 0.2)
            if not r:
                continue
            started = self._accept_one()
            if started:
                running = True

    def _accept_one(self) -> bool:
        try:
            conn, peer = self.listener.accept()
        except OSError:
            return False
        _tune(conn)
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        src = self.source
        try:
            hello = source_handshake(conn, npages=src.npages, page_size=src.page_size, config=self.config,
                                     token=self.token, settings=self._settings, check=self._check_session)
        except HandshakeRefused as e:
            self.log(f"refused a connection from {peer or 'a local peer'}: {e}")
            conn.close()
            return False
        except (OSError, ProtocolError) as e:
            self.log(f"handshake with {peer or 'a local peer'} failed: {e}")
            conn.close()
            return False
        if hello["channel"] == "probe":
            conn.close()
            return False
        conn.settimeout(None)
        epoch = hello["epoch"]
        if epoch <= self.epoch:
            conn.close()  # a straggler of an epoch already replaced
            return False
        self.session = hello["session"]
        for old in [e for e in self._pending if e < epoch]:
            for ch in self._pending.pop(old).values():
                ch.close()
            self._want.pop(old, None)
            self._resume.pop(old, None)
        chans = self._pending.setdefault(epoch, {})
        self._want[epoch] = hello["channels"]
        key = (hello["channel"], hello["index"])
        if key in chans:
            chans[key].close()
        chans[key] = Channel(conn, src.npages, src.page_size)
        if key == ("bg", 0):
            self._resume[epoch] = bool(hello.get("resume"))
        need = {("demand", i) for i in range(self._want[epoch])} | {("bg", 0)}
        if set(chans) != need:
            return False
        del self._pending[epoch]
        return self._start_epoch(epoch, chans)

    def _start_epoch(self, epoch: int, chans: dict) -> bool:
        src = self.source
        src.stop_epoch()
        bg = chans[("bg", 0)]
        demand = [chans[("demand", i)] for i in range(self._want.pop(epoch))]
        if self._resume.pop(epoch, False):
            try:
                bg.sock.settimeout(HANDSHAKE_TIMEOUT_S)
                f = bg.recv_frame()
                if f is None or f.type != T_RESUME:
                    raise ProtocolError("a resumed epoch must start with a RESUME frame")
                missing = src.apply_resume(bg.recv_resume(f))
                bg.sock.settimeout(None)
            except (OSError, ProtocolError) as e:
                self.log(f"epoch {epoch}: resume failed: {e}")
                for ch in demand + [bg]:
                    ch.close()
                return False
            self.info(f"state recovering: destination reconnected (epoch {epoch}); {missing} pages "
                     "not at the destination yet; resuming the stream where it stopped")
        self.epoch = epoch
        src.attach(demand, bg)
        try:
            bg.send_ctrl({"ready": True})  # the image is built: the destination may run the guest
        except OSError:
            pass  # the stream will notice the dead link at once
        src.start(fork_demand=self.fork_demand)
        self.info(f"state postcopy: serving epoch {epoch} ({len(demand)} demand channels)")
        return True

