"""The wire protocol on its own: the handshake's refusals and a fuzzed frame decoder.

The decoder is fed malformed, truncated, oversized and out-of-range frames
(hypothesis): it must answer with a clean ProtocolError (or end of link), never
let another exception escape, and never install a page outside the region.
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pctop.engine import transport as T
from pctop.engine.dest import Receiver

PS = 4096
NPAGES = 64
CFG = T.config_digest(NPAGES, PS, 1, 1)


# --- handshake ---
def _pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def _run(fn, *args, **kw):
    """Run fn in a thread; (result, exception)."""
    out: dict = {}

    def body():
        try:
            out["r"] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["e"] = e
    t = threading.Thread(target=body)
    t.start()
    return t, out


def _source_side(sock, token=None, npages=NPAGES, config=CFG):
    return T.source_handshake(sock, npages=npages, page_size=PS, config=config, token=token,
                              settings=lambda: {"bandwidth": 0})


def _dest_side(sock, token=None, npages=NPAGES, config=CFG, session="s1"):
    return T.dest_handshake(sock, npages=npages, page_size=PS, config=config, channel="demand", index=0,
                            channels=1, session=session, epoch=1, resume=False, token=token)


def test_handshake_agrees_and_carries_the_source_settings():
    a, b = _pair()
    t, out = _run(_source_side, a, b"secret")
    reply = _dest_side(b, b"secret")
    t.join(5)
    assert reply["ok"] and reply["bandwidth"] == 0
    assert out["r"]["session"] == "s1" and out["r"]["channel"] == "demand"


@pytest.mark.parametrize("dest_token", [b"wrong", None])
def test_a_wrong_or_missing_token_is_refused_and_both_ends_say_why(dest_token):
    a, b = _pair()
    t, out = _run(_source_side, a, b"secret")
    with pytest.raises(T.HandshakeRefused) as dest_err:
        _dest_side(b, dest_token)
    t.join(5)
    if dest_token is None:  # the destination itself refuses: it has no token to offer
        assert "requires a token" in str(dest_err.value)
        assert "requires a token" in str(out["e"]) and "destination refused" in str(out["e"])
    else:
        assert "wrong or missing token" in str(dest_err.value)
        assert isinstance(out["e"], T.HandshakeRefused) and "wrong or missing token" in str(out["e"])


def test_a_destination_of_another_version_is_refused_by_the_source_with_the_reason():
    a, b = _pair()
    t, out = _run(_source_side, a)
    T.recv_greeting(b)
    T.send_greeting(b, {"role": "dest", "channel": "bg", "index": 0, "channels": 1, "session": "x",
                        "epoch": 1, "npages": NPAGES, "page_size": PS, "config": CFG}, version=2)
    version, reply = T.recv_greeting(b)
    t.join(5)
    assert reply["ok"] is False and "version mismatch" in reply["error"] and "version 2" in reply["error"]
    assert "version mismatch" in str(out["e"])


def test_a_source_of_another_version_is_refused_by_the_destination_with_the_reason():
    a, b = _pair()
    T.send_greeting(a, {"role": "source", "npages": NPAGES, "page_size": PS, "config": CFG,
                        "auth": False, "nonce": "n"}, version=9)
    with pytest.raises(T.HandshakeRefused, match="source speaks version 9"):
        _dest_side(b)
    _, told = T.recv_greeting(a)  # the source is told why too
    assert "version 9" in told["refuse"]


def test_a_different_configuration_is_refused_naming_both_sides():
    a, b = _pair()
    t, out = _run(_source_side, a, None, 2 * NPAGES, T.config_digest(2 * NPAGES, PS, 1, 1))
    with pytest.raises(T.HandshakeRefused, match="configuration mismatch.*128 pages.*64 pages"):
        _dest_side(b)
    t.join(5)
    assert "configuration mismatch" in str(out["e"])


def test_a_peer_that_is_not_an_engine_is_a_protocol_error():
    a, b = _pair()
    a.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(T.ProtocolError, match="not a pctop engine"):
        T.recv_greeting(b)


def test_an_oversized_greeting_is_refused_before_it_is_read():
    a, b = _pair()
    a.sendall(T.GREETING.pack(T.MAGIC, 1, 0, 1 << 30))
    with pytest.raises(T.ProtocolError, match="greeting of"):
        T.recv_greeting(b)


# --- the frame decoder, fuzzed ---
class RecordingInstaller:
    """Stands in for the page installer (a real one needs a uffd per call, too slow for
    thousands of fuzz cases): it checks every install lands inside the region."""

    page_size = PS
    npages = NPAGES

    def __init__(self):
        self.calls = []

    def install(self, kind, start, count, addr):
        assert 0 <= start and count >= 1 and start + count <= NPAGES, (start, count)
        assert kind in T.KIND_NAMES
        self.calls.append((kind, start, count))
        return count, 0

    def install_page(self, kind, page, addr):
        return self.install(kind, page, 1, addr)[0]


def _feed(data: bytes, demand: bool = False) -> list:
    """Decode `data` as the destination would; the errors it reported."""
    a, b = socket.socketpair()
    b.sendall(data)
    b.close()
    errors: list = []
    inst = RecordingInstaller()
    rx = Receiver("fuzz", T.Channel(a, NPAGES, PS), inst, 8, on_error=errors.append, demand=demand,
                  on_ctrl=lambda m: None, on_end=lambda: None)
    try:
        rx.run()  # in this thread: any exception but the handled ones fails the test
    finally:
        rx.close()
        a.close()
    for e in errors:
        assert isinstance(e, (T.ProtocolError, OSError)), e
    return errors


def _frame(t, kind, count, start, length, payload=b""):
    return T.FRAME.pack(t, kind, 0, count, start, length) + payload


frame_st = st.builds(
    lambda t, kind, count, start, length, cut, body: _frame(t, kind, count, start, length, body)[:cut],
    st.integers(0, 9), st.integers(0, 5),
    st.sampled_from([0, 1, 2, 8, 9, NPAGES, NPAGES + 1, 2**31, 2**32 - 1]),
    st.sampled_from([0, 1, NPAGES - 1, NPAGES, 2**32, 2**63, 2**64 - 1]),
    st.sampled_from([0, 3, PS, 2 * PS, 8 * PS, 9 * PS, 2**40, 2**64 - 1]),
    st.integers(0, 200), st.binary(max_size=64))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(frame_st, st.binary(max_size=40)), max_size=4))
def test_background_decoder_survives_any_frames(parts):
    _feed(b"".join(parts))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(frame_st, st.binary(max_size=40)), max_size=3))
def test_demand_decoder_survives_any_frames(parts):
    _feed(b"".join(parts), demand=True)


def test_out_of_range_and_oversized_frames_are_refused_before_any_install():
    page = bytes(PS)
    cases = {
        "outside the region": _frame(T.T_PAGES, T.KIND_DEMAND, 1, NPAGES, PS, page),
        "outside the region ": _frame(T.T_PAGES, T.KIND_BACKGROUND, 2, 2**64 - 1, 2 * PS, page * 2),
        "bytes": _frame(T.T_PAGES, T.KIND_BACKGROUND, 1, 0, 2 * PS),  # count/length disagree
        "at most": _frame(T.T_PAGES, T.KIND_BACKGROUND, 9, 0, 9 * PS),  # more than the buffer
        "unknown frame type": _frame(77, 0, 0, 0, 0),
        "CTRL frame of": _frame(T.T_CTRL, 0, 0, 0, 1 << 40),
    }
    for why, data in cases.items():
        errors = _feed(data)
        assert len(errors) == 1 and why.strip() in str(errors[0]), (why, errors)


def test_a_frame_cut_short_is_a_link_closed_error_and_installs_nothing():
    errors = _feed(_frame(T.T_PAGES, T.KIND_BACKGROUND, 2, 0, 2 * PS, bytes(PS)))
    assert len(errors) == 1 and isinstance(errors[0], T.LinkClosed)


def test_request_decoder_refuses_pages_outside_the_region_and_huge_counts():
    for data, why in ((_frame(T.T_REQ, 0, 1, 0, 4) + struct.pack("<I", NPAGES), "outside the region"),
                      (_frame(T.T_REQ, 0, 2**31, 0, 2**33), "bad request frame")):
        a, b = socket.socketpair()
        b.sendall(data)
        with pytest.raises(T.ProtocolError, match=why):
            T.Channel(a, NPAGES, PS).recv_requests()
        a.close()
        b.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_request_decoder_survives_any_bytes(data):
    a, b = socket.socketpair()
    b.sendall(data)
    b.close()
    ch = T.Channel(a, NPAGES, PS)
    try:
        while (pages := ch.recv_requests()) is not None:
            assert all(p < NPAGES for p in pages)
    except T.ProtocolError:
        pass
    finally:
        a.close()


def test_resume_map_round_trips_and_refuses_a_wrong_length():
    a, b = socket.socketpair()
    present = bytearray(NPAGES)
    for p in (0, 5, 6, 63):
        present[p] = 1
    T.Channel(b, NPAGES, PS).send_resume(present)
    ch = T.Channel(a, NPAGES, PS)
    f = ch.recv_frame()
    assert f.type == T.T_RESUME and ch.recv_resume(f) == present
    b.sendall(_frame(T.T_RESUME, 0, 0, 0, 3))
    with pytest.raises(T.ProtocolError, match="RESUME"):
        ch.recv_frame()


def test_doctor_reports_netem_from_the_kernel_config(tmp_path):
    import gzip

    from pctop.doctor import INFO, check_netem
    from pctop.hostpaths import HostPaths

    for line, state in (("# CONFIG_NET_SCH_NETEM is not set", "absent"), ("CONFIG_NET_SCH_NETEM=m", "available")):
        with gzip.open(tmp_path / "config.gz", "wt") as f:
            f.write(f"CONFIG_NF_TABLES=y\n{line}\n")
        r = check_netem(HostPaths(proc=str(tmp_path)))
        assert r.status == INFO and not r.required and r.detail.startswith(state)
