"""Engine parts on their own: page image, framed transport, source process logic."""

from __future__ import annotations

import socket
import threading
import zlib

import pytest

from pctop.engine import image as I
from pctop.engine import transport as T
from pctop.engine.page_server import PageServer

PS = 4096


def test_page_header_layout_and_checksum():
    img = I.PageImage(16, PS, seed=7, generation=3)
    page = img.page(5)
    assert len(page) == PS and I.HEADER_SIZE == 64
    h = I.parse_header(page)
    assert h == I.PageHeader(b"PCTOPPG1", 5, 3, zlib.crc32(page[64:]))
    assert page[32:64] == bytes(32)


def test_image_is_deterministic_per_seed_and_distinct_per_page():
    a, b, c = I.PageImage(64, PS, seed=1), I.PageImage(64, PS, seed=1), I.PageImage(64, PS, seed=2)
    assert a.build() == b.build()
    assert a.page(3) != c.page(3)
    assert len({a.body(p) for p in range(64)}) == 64
    buf = bytearray(3 * PS)
    a.fill(buf, 10, 3)
    assert bytes(buf) == a.page(10) + a.page(11) + a.page(12)


def test_bad_page_size_is_refused():
    with pytest.raises(ValueError):
        I.PageImage(1, 48)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    ca, cb = T.Channel(a, 100, PS), T.Channel(b, 100, PS)
    yield ca, cb
    ca.close()
    cb.close()


def test_frames_round_trip(pair):
    dst, src = pair
    dst.send_request([3, 99, 0])
    assert list(src.recv_requests()) == [3, 99, 0]
    data = bytes(range(256)) * 32
    src.send_page_list(T.KIND_DEMAND, [(7, 1, data[:PS]), (8, 2, data * 2)])
    buf = memoryview(bytearray(3 * PS))
    f = dst.recv_frame()
    assert f == T.Frame(T.T_PAGES, T.KIND_DEMAND, 1, 7, PS)
    dst.recv_payload_into(buf, f.length)
    assert bytes(buf[:PS]) == data[:PS]
    f = dst.recv_frame()
    assert (f.start, f.count, f.length) == (8, 2, 2 * PS)
    dst.send_ctrl({"cmd": "pause"})
    f = src.recv_frame()
    assert src.recv_ctrl(f) == {"cmd": "pause"}


def test_pages_outside_region_are_refused_before_any_payload_is_read(pair):
    dst, src = pair
    src.sock.sendall(T.FRAME.pack(T.T_PAGES, T.KIND_BACKGROUND, 0, 2, 99, 2 * PS) + b"\xee" * 2 * PS)
    with pytest.raises(T.ProtocolError, match="outside the region"):
        dst.recv_frame()
    dst.send_request([5, 100])  # the source side checks requested page numbers too
    with pytest.raises(T.ProtocolError, match="page 100 outside the region"):
        src.recv_requests()


def test_frame_with_inconsistent_length_is_refused(pair):
    dst, src = pair
    src.sock.sendall(T.FRAME.pack(T.T_PAGES, T.KIND_DEMAND, 0, 1, 0, PS + 1))
    with pytest.raises(T.ProtocolError):
        dst.recv_frame()
    src.sock.sendall(T.FRAME.pack(9, 0, 0, 0, 0, 0))
    with pytest.raises(T.ProtocolError, match="unknown frame type"):
        dst.recv_frame()


def _source(npages=64, **kw):
    img = I.PageImage(npages, PS, seed=3)
    d_dst, d_src = socket.socketpair()
    b_dst, b_src = socket.socketpair()
    src = PageServer(img.build(), npages, PS, [T.Channel(d_src, npages, PS)], T.Channel(b_src, npages, PS), **kw)
    t = threading.Thread(target=src.run, daemon=True)
    t.start()
    return img, src, T.Channel(d_dst, npages, PS), T.Channel(b_dst, npages, PS), t


def _recv_pages(ch, upto_end=True):
    got = {}
    buf = memoryview(bytearray(512 * PS))
    while True:
        f = ch.recv_frame()
        if f is None or f.type == T.T_END:
            return got
        ch.recv_payload_into(buf, f.length)
        for i in range(f.count):
            assert f.start + i not in got, "a page was streamed twice"
            got[f.start + i] = (f.kind, bytes(buf[i * PS:(i + 1) * PS]))


def test_source_answers_demand_and_streams_the_rest_once():
    img, src, dem, bg, t = _source(background=False)
    dem.send_request([10, 11])
    buf = memoryview(bytearray(PS))
    for p in (10, 11):
        f = dem.recv_frame()
        assert (f.kind, f.start, f.count) == (T.KIND_DEMAND, p, 1)
        dem.recv_payload_into(buf, PS)
        assert bytes(buf) == img.page(p)
    bg.send_ctrl({"cmd": "finish"})  # background was off: now stream everything left
    got = _recv_pages(bg)
    assert set(got) == set(range(64)) - {10, 11}
    assert all(kind == T.KIND_BACKGROUND and data == img.page(p) for p, (kind, data) in got.items())
    bg.close()
    dem.close()
    t.join(5)
    assert not t.is_alive()


def test_source_prefetches_after_a_demand_fault():
    img, src, dem, bg, t = _source(npages=64, background=False, prefetch=4)
    src.paused = True
    src.background = True
    dem.send_request([20])
    assert dem.recv_frame().kind == T.KIND_DEMAND
    dem.recv_payload_into(memoryview(bytearray(PS)), PS)
    bg.send_ctrl({"cmd": "resume"})
    got = _recv_pages(bg)
    assert [p for p, (k, _) in got.items() if k == T.KIND_PREFETCH] == [21, 22, 23, 24]
    bg.close()
    dem.close()
    t.join(5)


class _SentByDemandMeanwhile(bytearray):
    """`sent`, where a demand thread sends the first unsent page the stream finds,
    between its two searches (as a demand-serving thread can at any moment)."""

    raced = False

    def find(self, sub, *args):
        i = super().find(sub, *args)
        if sub == b"\x00" and i >= 0 and not self.raced:
            self[i], self.raced = 1, True
        return i


def test_stream_runs_never_hold_zero_pages_when_demand_sends_meanwhile():
    # a run of 0 pages went out as a PAGES frame of 0 pages, which the destination
    # refuses ("pages N+0 outside the region"): seen once in CI, sharded with a stream
    sent = _SentByDemandMeanwhile(b"\x00\x00\x01\x00\x01\x01\x00\x00")
    runs = list(PageServer._unsent_runs(type("S", (), {"sent": sent})(), 0, len(sent)))
    assert runs == [(1, 1), (3, 1), (6, 2)]  # page 0 went by demand; before the fix, (0, 0) came first
    plain = bytearray(b"\x00\x00\x01\x00\x01\x01\x00\x00")
    assert list(PageServer._unsent_runs(type("S", (), {"sent": plain})(), 0, 8)) == [(0, 2), (3, 1), (6, 2)]


def test_requests_sent_back_to_back_are_parsed_from_one_recv(pair):
    dst, src = pair
    dst.send_request([1, 2])
    dst.send_request([3])
    got = list(src.recv_requests())
    while len(got) < 3:  # the kernel may deliver the two frames separately
        got += list(src.recv_requests())
    assert got == [1, 2, 3]
    dst.send_request([100])
    with pytest.raises(T.ProtocolError, match="page 100 outside"):
        src.recv_requests()


def test_demand_channel_takes_single_pages_only(pair):
    dst, src = pair
    page = bytes([7]) * PS
    src.send_pages(T.KIND_DEMAND, 42, 1, page)
    view = memoryview(bytearray(PS))
    assert dst.recv_demand_page(view) == T.Frame(T.T_PAGES, T.KIND_DEMAND, 1, 42, PS)
    assert bytes(view) == page
    src.send_pages(T.KIND_DEMAND, 10, 2, page * 2)
    with pytest.raises(T.ProtocolError, match="expected one page"):
        dst.recv_demand_page(view)
    src.close()


def test_a_partial_sendmsg_is_finished_in_order():
    a, b = socket.socketpair()
    parts = [b"h" * 24, bytes(range(256)) * 4096, b"t" * 10]
    expected = b"".join(parts)[100:]  # as if a first sendmsg had taken 100 bytes
    out = bytearray()

    def read_all() -> None:
        while len(out) < len(expected):
            out.extend(b.recv(1 << 16))

    t = threading.Thread(target=read_all)
    t.start()
    T._sendmsg_rest(a, parts, 100)
    t.join(10)
    a.close()
    b.close()
    assert bytes(out) == expected
