"""The exporter's metrics (pctop/export): names, units, labels, counter life, histogram edges,
and docs/metrics.md, all from Samples built here (the exporter is a view: a Sample in, text out).
"""

from __future__ import annotations

import dataclasses
import random
import re
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pctop import hist
from pctop.export.collector import OTHER, Exporter
from pctop.export.metrics import METRICS, PREFIX, STATES, bucket_edges_s, render_markdown
from pctop.model import (
    HIST_BUCKETS,
    Migration,
    Sample,
    StallParts,
    Target,
    UffdSample,
    VcpuSample,
)
from tests.conftest import ROOT
from tests.helpers.headers import DEGRADED


def _hist(**buckets: int) -> tuple[int, ...]:
    h = [0] * HIST_BUCKETS
    for k, n in buckets.items():
        h[int(k[1:])] = n
    return tuple(h)


def rich_target(pid: int = 100, comm: str = "qemu-vm1", faults: int = 3, tid: int = 1001) -> Target:
    """A target with every field the exporter reads set to something non-zero."""
    return Target(
        pid=pid, comm=comm,
        vcpus=(VcpuSample(vcpu=0, tid=tid, faults=faults, stall_ns=faults * 40_000,
                          hist=_hist(b5=faults - 1, b23=1), parts=StallParts(10_000, 20_000, 5_000),
                          faults_no_read=1, exits={"mmio": 4, "efault": 2}, memory_fault_exits=2,
                          vmm_blocktime_ms=0.5),
               VcpuSample(vcpu=None, tid=tid + 1, faults=1, stall_ns=3_000, hist=_hist(b1=1))),
        uffds=(UffdSample(fd=12, pending_mean=2.5, pending_max=7, total_mean=4.0, total_max=9, in_service_max=4,
                          msgs_read=5, pages_installed=6, bytes_installed=6 * 4096, copies=5, zeropages=1,
                          wakes=1, eexist=1),),
        handler_cpu_pct=50.0,
        migration=Migration(source="qmp", state="postcopy", pages_total=1000, pages_received=250,
                            bandwidth_bps=1e6, eta_s=3.0,
                            extra={"bandwidth_limit_bps": 2_000_000, "role": "destination",
                                   "qemu_status": "postcopy-active", "postcopy_blocktime_ms": 12,
                                   "postcopy_requests": 40, "ram_transferred_bytes": 1 << 20,
                                   "ram_remaining_bytes": 1 << 21, "dirty_pages_rate": 3}))


def sample(seq: int, *targets: Target, interval_s: float = 1.0, events=()) -> Sample:
    return Sample(time=1000.0 + seq, interval_s=interval_s, seq=seq, probe_tier="procfs",
                  sources=("procfs",), targets=tuple(targets), events=tuple(events))


def scrape(ex: Exporter, openmetrics: bool = False) -> str:
    return ex.render(openmetrics).decode()


def series(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return series(text)[(name, tuple(sorted(labels.items())))]


# ---- names and units -------------------------------------------------------

BASE_UNITS = ("seconds", "bytes", "ratio")
NOT_BASE = re.compile(r"(^|_)(ms|ns|us|milliseconds|microseconds|nanoseconds|percent|pct|bps|kb|mb|"
                      r"kib|mib|pages_per_s)(_|$)")


@pytest.mark.parametrize("key", list(METRICS))
def test_metric_names_follow_prometheus_conventions(key):
    m = METRICS[key]
    assert re.fullmatch(r"[a-z_][a-z0-9_]*", m.full), m.full
    assert m.full.startswith(PREFIX) and PREFIX not in m.name
    assert not NOT_BASE.search(m.name), f"{m.full}: not a base unit"
    assert m.name.endswith("_total") == (m.kind == "counter"), m.full
    assert m.name.endswith("_info") == (m.kind == "info"), m.full
    # one unit per metric: at most one base unit word in the name
    assert sum(u in m.name.split("_") for u in BASE_UNITS) <= 1, m.full
    # no label that could take a thread id or a free-form value
    assert not {"tid", "thread", "name", "addr", "address"} & set(m.labels), m.full


def test_every_metric_is_exposed_once_with_its_labels_and_only_those():
    ex = Exporter(DEGRADED)
    ex.observe(sample(1, rich_target()))
    text = scrape(ex)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    # the text format has no info type: an info is a gauge of value 1 named ..._info
    expected = {m.full.removesuffix("_total"): m for m in METRICS.values()}
    assert set(fams) == set(expected)
    for name, fam in fams.items():
        m = expected[name]
        assert fam.type == ("gauge" if m.kind == "info" else m.kind), name
        assert fam.samples, f"{name} has no series for a target that sets every field"
        for s in fam.samples:
            assert set(s.labels) - {"le"} == set(m.labels), (name, s.labels)


def test_values_are_in_base_units():
    ex = Exporter(DEGRADED)
    t = rich_target(faults=3)
    ex.observe(sample(1, t, interval_s=2.0))
    text = scrape(ex)
    v0 = dict(vm="qemu-vm1", pid="100", vcpu="0")
    assert value(text, "pctop_vcpu_stall_seconds_sum", **v0) == pytest.approx(120e-6)
    assert value(text, "pctop_vcpu_stall_part_seconds_total", part="queued", **v0) == pytest.approx(10e-6)
    assert value(text, "pctop_vcpu_stall_part_seconds_total", part="runqueue", **v0) == pytest.approx(5e-6)
    assert value(text, "pctop_qemu_vcpu_blocktime_seconds_total", **v0) == pytest.approx(0.5e-3)
    assert value(text, "pctop_handler_cpu_seconds_total", vm="qemu-vm1", pid="100") == pytest.approx(1.0)
    mig = dict(vm="qemu-vm1", pid="100", source="qmp")
    assert value(text, "pctop_migration_progress_ratio", **mig) == 0.25
    assert value(text, "pctop_migration_bandwidth_limit_bytes_per_second", **mig) == 2e6
    q = dict(vm="qemu-vm1", pid="100", role="destination")
    assert value(text, "pctop_qemu_postcopy_blocktime_seconds", **q) == pytest.approx(0.012)
    assert value(text, "pctop_qemu_migration_status", status="postcopy-active", **q) == 1
    u = dict(vm="qemu-vm1", pid="100", fd="12")
    assert value(text, "pctop_uffd_installed_bytes_total", **u) == 6 * 4096
    assert value(text, "pctop_uffd_in_service_faults_mean", **u) == 1.5  # total - pending
    assert value(text, "pctop_uffd_in_service_faults_max", **u) == 4
    assert value(text, "pctop_uffd_ioctls_total", op="zeropage", **u) == 1
    states = {dict(k[1])["state"]: v for k, v in series(text).items() if k[0] == "pctop_migration_state"}
    assert states == {s: float(s == "postcopy") for s in STATES}
    assert value(text, "pctop_probe_info", tier="procfs", missing="ebpf,debugfs") == 1
    assert value(text, "pctop_build_info", version="9.9.9", schema="1") == 1


# ---- labels stay bounded ---------------------------------------------------

def test_thread_ids_never_multiply_series():
    """A vCPU whose thread changes (and 50 short-lived helper threads) keep one series each."""
    ex = Exporter(DEGRADED)
    for seq in range(1, 51):
        t = rich_target(tid=10_000 + 2 * seq)  # new tids for vCPU 0 and the other thread
        ex.observe(sample(seq, t))
    s = series(scrape(ex))
    faults = {k: v for k, v in s.items() if k[0] == "pctop_vcpu_stall_faults_total"}
    assert {dict(k[1])["vcpu"] for k in faults} == {"0", OTHER}
    assert faults[("pctop_vcpu_stall_faults_total", (("pid", "100"), ("vcpu", "0"), ("vm", "qemu-vm1")))] == 150
    assert faults[("pctop_vcpu_stall_faults_total", (("pid", "100"), ("vcpu", OTHER), ("vm", "qemu-vm1")))] == 50
    per_vcpu_series = len([k for k in s if dict(k[1]).get("vcpu") == "0"])
    assert per_vcpu_series == len([k for k in series(_one_scrape()) if dict(k[1]).get("vcpu") == "0"])


def _one_scrape() -> str:
    ex = Exporter(DEGRADED)
    ex.observe(sample(1, rich_target()))
    return scrape(ex)


# ---- counters only grow, series come and go as documented --------------------

COUNTERS = {m.full for m in METRICS.values() if m.kind == "counter"} | {
    m.full + suffix for m in METRICS.values() if m.kind == "histogram" for suffix in ("_bucket", "_count", "_sum")}


def test_counters_are_monotonic_across_intervals_and_targets_that_come_and_go():
    """Random intervals over 3 targets that appear, skip vCPUs, exit and return: a counter
    series in two consecutive scrapes never goes down, and each equals the sum of its
    intervals since it appeared (a target leaves /metrics only on the scrape after its
    last interval, and a pid that returns after that starts from 0)."""
    rng = random.Random(15)
    ex = Exporter(DEGRADED)
    alive = {1: False, 2: False, 3: False}
    expected: dict[tuple[int, int], int] = {}  # (pid, vcpu) -> faults since the series appeared
    leaving: set[int] = set()  # absent from the last Sample: removed by the next scrape
    prev: dict = {}
    removed: set[str] = set()
    scrapes = 0
    for seq in range(1, 300):
        targets = []
        for pid in alive:
            if rng.random() < 0.1:
                alive[pid] = not alive[pid]
            if not alive[pid]:
                continue
            vcpus = []
            for vcpu in range(3):
                if rng.random() < 0.3:
                    continue  # the vCPU has no row this interval
                n = rng.randrange(0, 50)
                h = [0] * HIST_BUCKETS
                for _ in range(n):
                    h[rng.randrange(HIST_BUCKETS)] += 1
                vcpus.append(VcpuSample(vcpu=vcpu, tid=pid * 100 + vcpu, faults=n, hist=tuple(h),
                                        stall_ns=n * 1000))
                expected[(pid, vcpu)] = expected.get((pid, vcpu), 0) + n
            targets.append(Target(pid=pid, comm=f"vm{pid}", vcpus=tuple(vcpus)))
        ex.observe(sample(seq, *targets))
        leaving = {p for p, a in alive.items() if not a and any(k[0] == p for k in expected)}
        if rng.random() < 0.5:
            continue
        now = series(scrape(ex))
        scrapes += 1
        for key, v in now.items():
            if key[0] in COUNTERS and key in prev and dict(key[1]).get("pid") not in removed:
                assert v >= prev[key], (seq, key, prev[key], v)
        for (pid, vcpu), n in expected.items():
            labels = (("pid", str(pid)), ("vcpu", str(vcpu)), ("vm", f"vm{pid}"))
            assert now[("pctop_vcpu_stall_faults_total", labels)] == n, (seq, pid, vcpu)
            assert now[("pctop_vcpu_stall_seconds_count", labels)] == n
            assert now[("pctop_vcpu_stall_seconds_sum", labels)] == pytest.approx(n * 1e-6)
        for k in [k for k in expected if k[0] in leaving]:
            del expected[k]
        removed = {str(p) for p in leaving}  # a pid that returns after this scrape starts over
        prev = now
    assert scrapes > 100


def test_a_target_that_exits_is_scraped_once_more_then_removed():
    ex = Exporter(DEGRADED)
    ex.observe(sample(1, rich_target(pid=1), rich_target(pid=2)))
    ex.observe(sample(2, rich_target(pid=1), rich_target(pid=2, faults=5)))  # pid 2's last interval
    ex.observe(sample(3, rich_target(pid=1)))  # pid 2 gone
    ex.observe(sample(4, rich_target(pid=1)))
    first = series(scrape(ex))
    key2 = ("pctop_vcpu_stall_faults_total", (("pid", "2"), ("vcpu", "0"), ("vm", "qemu-vm1")))
    assert first[key2] == 8  # its last faults are scraped
    assert value(scrape_text := scrape(ex), "pctop_targets") == 1
    assert key2 not in series(scrape_text)
    assert ("pctop_vcpu_stall_faults_total", (("pid", "1"), ("vcpu", "0"), ("vm", "qemu-vm1"))) in series(scrape_text)


def test_a_vcpu_seen_again_keeps_its_series_and_value():
    ex = Exporter(DEGRADED)
    t = rich_target(faults=4)
    ex.observe(sample(1, t))
    quiet = dataclasses.replace(t, vcpus=(), uffds=())
    ex.observe(sample(2, quiet))
    v0 = dict(vm="qemu-vm1", pid="100", vcpu="0")
    text = scrape(ex)
    assert value(text, "pctop_vcpu_stall_faults_total", **v0) == 4
    assert value(text, "pctop_uffd_pending_faults_mean", vm="qemu-vm1", pid="100", fd="12") == 0  # gauge: not now
    assert value(text, "pctop_uffd_messages_read_total", vm="qemu-vm1", pid="100", fd="12") == 5  # counter: kept
    ex.observe(sample(3, t))
    assert value(scrape(ex), "pctop_vcpu_stall_faults_total", **v0) == 8


def test_collection_errors_are_counted():
    from pctop.model import Event
    ex = Exporter(DEGRADED)
    ex.observe(sample(1, events=(Event(1.0, "error", "engine failed: x"), Event(1.0, "target-new", "y"))))
    ex.observe(sample(2, events=(Event(2.0, "error", "procfs failed: z"),)))
    text = scrape(ex)
    assert value(text, "pctop_collection_errors_total") == 2
    assert value(text, "pctop_samples_total") == 2
    assert value(text, "pctop_last_sample_timestamp_seconds") == 1002.0


# ---- histogram edges ---------------------------------------------------------

def test_le_edges_are_the_upper_edges_of_the_log2_buckets():
    assert len(bucket_edges_s()) == HIST_BUCKETS - 1
    for n, edge in enumerate(bucket_edges_s()):
        assert edge == hist.bucket_bounds(n)[1] / 1e6
    ex = Exporter(DEGRADED)
    ex.observe(sample(1, rich_target(faults=3)))
    les = [s.labels["le"] for f in text_string_to_metric_families(scrape(ex)) if f.name == "pctop_vcpu_stall_seconds"
           for s in f.samples if s.name.endswith("_bucket") and s.labels["vcpu"] == "0"]
    assert les[-1] == "+Inf" and [float(x) for x in les[:-1]] == bucket_edges_s()


@pytest.mark.parametrize("us", [0.3, 1, 1.9, 2, 3, 1023.99, 1024, 1025, 2**22, 2**23 - 1])
def test_a_stall_is_counted_from_the_first_le_at_or_above_it_and_at_most_one_bucket_high(us):
    h = [0] * HIST_BUCKETS
    h[hist.bucket_index(us)] = 1
    ex = Exporter(DEGRADED)
    ex.observe(sample(1, Target(pid=1, comm="x", vcpus=(VcpuSample(vcpu=0, tid=1, faults=1, hist=tuple(h),
                                                                  stall_ns=int(us * 1000)),))))
    buckets = [(float(s.labels["le"]), s.value) for f in text_string_to_metric_families(scrape(ex))
               if f.name == "pctop_vcpu_stall_seconds" for s in f.samples if s.name.endswith("_bucket")]
    first = min(le for le, n in buckets if n == 1)
    assert first >= us / 1e6  # never low
    assert first <= max(2 * us, 2) / 1e6 * (1 + 1e-9)  # at most one bucket high
    assert buckets[-1] == (float("inf"), 1)


def test_the_last_bucket_is_only_in_inf():
    ex = Exporter(DEGRADED)
    ex.observe(sample(1, Target(pid=1, comm="x", vcpus=(VcpuSample(vcpu=0, tid=1, faults=2, hist=_hist(b23=2)),))))
    text = scrape(ex)
    v = dict(vm="x", pid="1", vcpu="0")
    assert value(text, "pctop_vcpu_stall_seconds_bucket", le="8.388608", **v) == 0
    assert value(text, "pctop_vcpu_stall_seconds_bucket", le="+Inf", **v) == 2
    assert value(text, "pctop_vcpu_stall_seconds_count", **v) == 2


# ---- the exposition is valid for Prometheus's own checker ----------------------

def test_promtool_check_metrics_passes_on_the_exposition():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing (Debian package prometheus; make setup installs it)")
    ex = Exporter(DEGRADED)
    ex.observe(sample(1, rich_target(pid=1), rich_target(pid=2, comm="fc_vmm")))
    r = subprocess.run([promtool, "check", "metrics"], input=scrape(ex), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def _om_series(text: str) -> dict:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in om_families(text) for s in f.samples}


def test_the_openmetrics_exposition_has_the_same_series_and_values():
    """promtool reads only the text format; OpenMetrics (what Prometheus asks for) is checked
    by prometheus_client's strict OpenMetrics parser, series by series against the text."""
    ex = Exporter(DEGRADED)
    ex.observe(sample(1, rich_target(pid=1), rich_target(pid=2, comm="fc_vmm")))
    om = scrape(ex, openmetrics=True)
    assert om.endswith("\n# EOF\n")
    assert _om_series(om) == series(scrape(ex))


def test_label_values_and_help_are_escaped():
    """A process names itself (prctl): quotes, backslashes and newlines must come back intact."""
    comm = 'a"b\\c\nd'
    ex = Exporter(DEGRADED)
    ex.observe(sample(1, rich_target(pid=1, comm=comm)))
    for text, parse in ((scrape(ex), series), (scrape(ex, openmetrics=True), _om_series)):
        vms = {dict(k[1]).get("vm") for k in parse(text)} - {None}
        assert vms == {comm}


# ---- docs/metrics.md: one source with the JSON schema ----------------------------

def test_docs_metrics_md_is_generated_from_the_metric_table():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    assert doc == render_markdown(), "run: .venv/bin/python -m pctop.export.metrics > docs/metrics.md"


def _model_fields(cls) -> dict[str, object]:
    return {f.name: f for f in dataclasses.fields(cls)}


def test_every_json_field_a_metric_names_exists_in_the_model_and_in_schema_md():
    from pctop import model

    schema = (ROOT / "docs" / "schema.md").read_text()
    roots = {"vcpus[]": model.VcpuSample, "uffds[]": model.UffdSample, "targets[]": model.Target,
             "migration": model.Migration, "header": model.Header, "events[]": model.Event}
    nested = {"parts": model.StallParts}
    for m in METRICS.values():
        for path in m.json:
            head, _, rest = path.partition(".")
            if not rest:  # a Sample field
                assert head in _model_fields(model.Sample), path
                field = head
            else:
                cls = roots[head]
                field, _, sub = rest.partition(".")
                assert field in _model_fields(cls), path
                if sub and field in nested:
                    assert sub in _model_fields(nested[field]), path
                    field = sub
                elif sub:  # a key of Migration.extra: documented in schema.md's extra list
                    field = sub
            assert f"`{field}`" in schema, f"{path} ({m.full}) is not described in docs/schema.md"


def test_the_vm_label_is_the_guests_name_when_the_vmm_gives_one():
    ex = Exporter(DEGRADED)
    ex.observe(sample(1, dataclasses.replace(rich_target(pid=1, comm="qemu-system-x86"), vm_name="web-7"),
                      rich_target(pid=2, comm="fc_vmm")))
    vms = {(dict(k[1])["pid"], dict(k[1])["vm"]) for k in series(scrape(ex)) if k[0] == "pctop_handler_cpu_seconds_total"}
    assert vms == {("1", "web-7"), ("2", "fc_vmm")}
