"""probes/pctop_defs.h is the one place the values shared by the BPF programs and
Python are written; Python reads them (pctop.sources.probe_defs). These tests hold
the few that Python must also know without the header to it, and check the parser."""

from __future__ import annotations

from pctop import model
from pctop.sources import ebpf, probe_defs, readings


def test_the_header_is_read():
    defs = probe_defs.DEFS
    assert defs["HIST_BUCKETS"] == model.HIST_BUCKETS == readings.HIST_BUCKETS
    assert defs["CFG_SLOTS"] == 1 + max(v for k, v in defs.items() if k.startswith("CFG_") and k != "CFG_SLOTS")
    assert len(ebpf.DEBUG_COUNTERS) == defs["DBG_SLOTS"]
    assert ebpf.DEBUG_COUNTERS[defs["DBG_MISSED_WAKE"]] == "missed_wake"
    assert (ebpf.CFG_EPOCH, ebpf.TARGET_HANDLER, ebpf.HINT_SLOTS) == (defs["CFG_EPOCH"], defs["TARGET_HANDLER"],
                                                                      defs["HINT_SLOTS"])


def test_defines_are_parsed_in_their_c_spellings():
    text = """#define A 12
#define B 0xc018aa3f
#define C 100000ULL /* a comment */
#define D (~0xfffULL)
#define E_NAME(x) (x)
#define F 3   /* three */
  #define G 4
"""
    assert probe_defs.read_defines(text) == {"A": 12, "B": 0xc018aa3f, "C": 100000, "F": 3}


def test_slots_are_named_in_slot_order(monkeypatch):
    monkeypatch.setattr(probe_defs, "DEFS", {"X_TWO": 2, "X_ZERO": 0, "X_ONE": 1, "X_SLOTS": 3, "Y_ZERO": 0})
    assert probe_defs.slots_named("X_") == ("zero", "one", "two")
