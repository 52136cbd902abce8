"""Pure rendering of the TUI's widgets: numbers, bars, sparklines, severity,
histogram rows, stall parts, header lines. No App needed."""

from __future__ import annotations

from dataclasses import replace

from pctop.hist import bucket_index
from pctop.model import HIST_BUCKETS, Header, Migration, ProbeTier, StallParts
from pctop.ui.history import History
from pctop.ui.synthetic import synthetic_sample
from pctop.ui.widgets.header import header_text
from pctop.ui.widgets.latency import hist_text, parts_text
from pctop.ui.widgets.render import (
    CRIT,
    IDLE,
    OK,
    WARN,
    Part,
    bar,
    bucket_label,
    fmt_bytes,
    fmt_duration,
    fmt_rate,
    fmt_us,
    latency_severity,
    sparkline,
    stacked_bar,
    stall_severity,
)
from pctop.ui.widgets.uffd_panel import uffd_text


def test_numbers_fit_their_columns():
    assert fmt_rate(0) == "0"
    assert fmt_rate(3.25) == "3.2"
    assert fmt_rate(999) == "999"
    assert fmt_rate(12_345) == "12.3k"
    assert fmt_rate(4_500_000) == "4.5M"
    assert fmt_rate(None) == "-"
    assert fmt_us(42) == "42µs"
    assert fmt_us(1500) == "1.5ms"
    assert fmt_us(2_500_000) == "2.5s"
    assert fmt_bytes(2 * 1024 * 1024, per_s=True) == "2.0 MiB/s"
    assert fmt_duration(75) == "1m15s"
    assert all(len(fmt_rate(x)) <= 6 for x in (0.1, 9.99, 99.9, 999.9, 99_999, 9e8, 5e11))


def test_unit_is_picked_after_rounding_so_cells_never_overflow():
    # Values just under a unit boundary round up into the next unit, not to 4 digits.
    assert fmt_us(99_960) == "100ms"
    assert fmt_us(999.6) == "1.0ms"
    assert fmt_us(999_600) == "1.0s"
    assert fmt_us(9.96) == "10µs"
    assert fmt_rate(9.96) == "10"
    assert fmt_rate(999.6) == "1.0k"
    assert fmt_rate(99_960) == "100k"
    # Every value near a boundary from 0.01 to 1e12 (latency: to 1e10 us, 2.7 hours)
    # fits the 6-wide latency and rate columns.
    xs = [m * 10 ** e for e in range(-2, 12) for m in (0.9996, 0.99996, 1, 1.5, 9.96, 9.9996)]
    assert max(len(fmt_us(x)) for x in xs if x < 1e10) <= 6
    assert max(len(fmt_rate(x)) for x in xs) <= 6


def test_bucket_labels_are_lower_bounds():
    assert [bucket_label(n) for n in (0, 9, 10, 20)] == ["1µs", "512µs", "1ms", "1s"]


def test_severity_has_symbol_and_word_not_only_colour():
    assert stall_severity(0, 0.0) is IDLE
    assert stall_severity(10, 0.01) is OK
    assert stall_severity(10, 0.10) is WARN
    assert stall_severity(10, 0.50) is CRIT
    assert latency_severity(None) is IDLE
    assert latency_severity(100) is OK and latency_severity(1000) is WARN and latency_severity(9000) is CRIT
    symbols = {s.symbol for s in (OK, WARN, CRIT)}
    assert len(symbols) == 3 and " " not in symbols


def test_sparkline_scales_to_max_and_keeps_width():
    s = sparkline([0, 5, 10], 6)
    assert s == "▁▅█   "
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8], 4) == sparkline([5, 6, 7, 8], 4, top=8)
    assert sparkline([], 5) == "     "
    assert sparkline([0, 0], 2) == "▁▁"


def test_bar_uses_eighths():
    assert bar(0.5, 4) == "██  "
    assert bar(1 / 16, 2) == "▏ "
    assert bar(2.0, 3) == "███"
    assert bar(-1, 3) == "   "


def test_stacked_bar_fills_width_exactly_with_distinct_chars():
    t = stacked_bar([Part("a", 1, "█", ""), Part("b", 1, "▓", ""), Part("c", 1, "░", "")], 10)
    assert len(t.plain) == 10
    assert t.plain.count("█") + t.plain.count("▓") + t.plain.count("░") == 10
    assert {t.plain.count(c) for c in "█▓░"} <= {3, 4}
    assert stacked_bar([Part("a", 0, "█", "")], 5).plain == "·····"


def test_histogram_rows_mark_percentiles_in_their_buckets():
    hist = [0] * HIST_BUCKETS
    hist[5] = 90  # 32..64 us
    hist[12] = 10  # 4..8 ms
    text = hist_text(hist, 60, 20, "all").plain
    rows = text.splitlines()[1:]
    assert rows[0].strip().startswith("32µs") and "◄p50" in rows[0]
    p99_row = next(r for r in rows if "◄p99" in r)
    assert p99_row.strip().startswith("4ms")
    assert len(rows) == 12 - 5 + 1  # every bucket from the first to the last used
    # Too little height: buckets are merged, never dropped.
    merged = hist_text(hist, 60, 3, "all").plain.splitlines()[1:]
    assert len(merged) <= 3 and "◄p99" in "".join(merged)
    assert "no stalls" in hist_text([0] * HIST_BUCKETS, 60, 5, "x").plain


def test_histogram_percentiles_never_exceed_the_longest_stall():
    hist = [0] * HIST_BUCKETS
    hist[16] = 100  # 65.5..131 ms: p99 estimated from the bucket alone would be ~130ms
    assert "p99 130ms" in hist_text(hist, 80, 10, "all").plain
    text = hist_text(hist, 80, 10, "all", max_us=100_000).plain
    assert "p99 100ms" in text and "p50 100ms" not in text


def test_parts_say_what_is_missing_when_degraded():
    assert "need the eBPF probes" in parts_text(StallParts(), 10, 40, "t", "procfs").plain
    # With the probes, faults without parts did not wait on a uffd (vcpu-exit).
    with_probes = parts_text(StallParts(), 10, 120, "t", "ebpf").plain
    assert "eBPF" not in with_probes and "waited on no uffd" in with_probes
    assert "no stall time" in parts_text(StallParts(), 0, 40, "t").plain
    t = parts_text(StallParts(2000, 1000, 1000), 2, 70, "t").plain
    assert "queued 50%" in t and "in service 25%" in t and "run-queue 25%" in t
    narrow = parts_text(StallParts(2000, 1000, 1000), 2, 30, "t").plain
    assert all(len(line) <= 30 for line in narrow.splitlines()[1:])


def test_header_says_degraded_and_what_is_missing():
    h = Header(host="hostA", kernel="6.18", probe_tier="procfs", sources=("procfs",),
               missing=("ebpf: no kernel headers",), started=100.0)
    s = synthetic_sample(seq=1, tier=ProbeTier.PROCFS)
    text = header_text(h, s, "▶ live", 200).plain
    assert "DEGRADED" in text and "no kernel headers" in text and "hostA" in text
    assert "POSTCOPY" in text and "ETA" in text and "pages" in text
    ok = header_text(h._replace(probe_tier="ebpf") if hasattr(h, "_replace") else
                     Header(host="hostA", kernel="6.18", probe_tier="ebpf", sources=()),
                     synthetic_sample(seq=1), "▶ live", 200).plain
    assert "DEGRADED" not in ok


def test_header_shows_stream_paused_and_limit():
    s = synthetic_sample(seq=2)
    t = s.targets[0]
    m = Migration(source="engine", state="postcopy", pages_total=100, pages_received=25,
                  extra={"background": "paused", "bandwidth_limit_bps": 4 << 20,
                         "strategy": "vcpu-exit", "address_source": "guest-assisted"})
    s2 = s.__class__(**{**s.__dict__, "targets": (t.__class__(**{**t.__dict__, "migration": m}),)})
    text = header_text(Header("h", "k", "ebpf", ()), s2, "x", 200).plain
    assert "stream PAUSED" in text and "limit 4.0 MiB/s" in text and "25.0%" in text
    assert "vcpu-exit (addresses: guest-assisted)" in text


def test_uffd_panel_gauges_and_history():
    h = History()
    for i in range(1, 6):
        h.add(synthetic_sample(seq=i, uffds=2))
    s = synthetic_sample(seq=6, uffds=2)
    h.add(s)
    text = uffd_text(s, h, 70).plain
    assert text.count("pending") == 2 and text.count("in service") == 2
    assert "handler CPU 35%" in text and "reads 1.0k/s" in text
    assert all(len(line) <= 70 for line in text.splitlines())


def test_history_clears_on_a_gap_in_seq():
    h = History()
    h.add(synthetic_sample(seq=1))
    h.add(synthetic_sample(seq=2))
    key = next(iter(h.vcpus))
    assert len(h.vcpus[key].faults_per_s) == 2
    h.add(synthetic_sample(seq=9))
    assert len(h.vcpus[key].faults_per_s) == 1 and h.samples == 1
    total = sum(v.faults for t in synthetic_sample(seq=9).targets for v in t.vcpus)
    assert sum(s.faults_total for s in h.vcpus.values()) == total
    assert sum(h.hist_total) == sum(sum(v.hist) for v in synthetic_sample(seq=9).targets[0].vcpus)
    assert bucket_index(1.0) == 0  # the shared histogram module is the one used


def test_timeline_chart_fills_in_eighths_from_the_bottom():
    from pctop.ui.widgets.timeline import chart_rows, timeline_text

    assert chart_rows([0, 4, 8], 3, 1, 8) == [" ▄█"]
    top, bottom = chart_rows([0, 4, 8, 16], 5, 2, 16)
    assert bottom == " ▄██ " and top == "   █ "
    h = History()
    for i in range(1, 4):
        h.add(synthetic_sample(seq=i, uffds=2))
    text = timeline_text(h, 60, 15).plain
    assert "faults/s, all vCPUs" in text and "uffd pending" in text and "% of time stalled" in text
    s3 = synthetic_sample(seq=3, uffds=2)
    assert h.total_faults[-1] == sum(v.faults_per_s for v in s3.targets[0].vcpus)
    assert h.queue_depth[-1] == sum(u.total_mean for u in s3.targets[0].uffds)


def test_table_columns_qemu_blocktime_only_when_reported_and_narrow_drops_low_priority():
    from pctop.ui.widgets.vcpu_table import fixed_width, fmt_ms, visible_columns

    keys = lambda cols: [c.key for c in cols]  # noqa: E731
    wide = keys(visible_columns(120, vmm=False))
    assert "vmm" not in wide and {"p50", "max", "exits", "parts"} <= set(wide)
    wide_vmm = keys(visible_columns(120, vmm=True))
    assert wide_vmm.index("vmm") == wide_vmm.index("stall") + 1  # beside pctop's own stall
    # 80 columns (78 inside a scrollbar): QEMU's column costs exits/s, nothing else.
    narrow = visible_columns(78, vmm=True)
    assert keys(narrow) == ["target", "vcpu", "faults", "stall", "vmm", "p50", "p99", "max", "trend"]
    assert fixed_width(narrow) + 10 < 78
    assert "exits" in keys(visible_columns(78, vmm=False))
    # Narrower still: p50 goes next, then max; the measured stall and QEMU's stay.
    assert keys(visible_columns(64, vmm=True)) == ["target", "vcpu", "faults", "stall", "vmm", "p99", "trend"]
    assert (fmt_ms(None), fmt_ms(0), fmt_ms(412.0), fmt_ms(1500.0)) == ("-", "0", "412ms", "1.5s")


def test_key_bar_groups_and_wraps_whole_entries_in_order():
    from textual.binding import Binding

    from pctop.ui.widgets.keybar import entries, wrap

    rate = Binding.Group("rate ")
    bindings = [(Binding("q", "quit", "Quit"), True),
                (Binding("minus", "r(0)", "slower", group=rate), True),
                (Binding("plus", "r(1)", "faster", group=rate), True),
                (Binding("x", "drop", "Drop link"), False)]
    shown = {"minus": "-", "plus": "+"}
    items = entries(bindings, lambda b: shown.get(b.key, b.key))
    assert [(e.keys, e.label, e.enabled) for e in items] == [
        ((("q", "q"),), "Quit", True), ((("minus", "-"), ("plus", "+")), "rate", True),
        ((("x", "x"),), "Drop link", False)]
    assert [e.width for e in items] == [len("q Quit"), len("- + rate"), len("x Drop link")]
    # 14 cells: "q Quit  - + rate" is 16, so the group starts the second row, whole.
    rows = wrap(items, 14)
    assert rows == [items[:1], items[1:2], items[2:]]
    assert wrap(items, 80) == [items]
    assert [e for row in wrap(items, 20) for e in row] == items


def test_header_wraps_a_long_migration_line_instead_of_cutting_its_figures():
    m = Migration(source="engine", state="postcopy", pages_total=262144, pages_received=189000,
                  pages_demand=88000, bandwidth_bps=16 << 20, eta_s=12.0,
                  extra={"strategy": "uffd", "bandwidth_limit_bps": 16 << 20, "background": "running"})
    sample = synthetic_sample(seq=1, vcpus=2)
    sample = replace(sample, targets=(replace(sample.targets[0], migration=m),))
    head = Header(host="vm", kernel="6.18", probe_tier="ebpf", sources=("ebpf",))
    for width in (80, 120):
        lines = header_text(head, sample, "live", width).plain.splitlines()
        assert any("189k/262k pages" in ln for ln in lines) and all(len(ln) <= width for ln in lines[1:])
    assert "host vm" in lines[0]
