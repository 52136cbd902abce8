"""Both ends of one real QEMU post-copy migration in one Prometheus, and the Grafana dashboard's
every query against it.

Two "hosts" (network namespaces joined to the root namespace, tests/helpers/netns.py HostNs): on the
source host `pctop export -p SOURCE_QEMU --qmp-source SOURCE`, on the destination host
`pctop export -p DEST_QEMU --qmp DEST` (with its eBPF probes: the destination is where the
faults are). Each knows only its own QEMU, as on two real hosts.
A Prometheus in the root namespace scrapes both across the veth links every 0.5 s while two
QEMUs migrate pctop's boot-sector guest with post-copy (about 4 s, tests/system/test_qemu_postcopy.py).
The source host's exporter runs on /proc only: its QEMU takes no post-copy faults, and one set
of probes keeps the run short.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

import pytest

from tests.conftest import ROOT, need_root
from tests.helpers.netns import HostNs, can_make_netns
from tests.helpers.promserver import Prometheus, exporter, free_port, need_prometheus, prometheus

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

DASHBOARD = ROOT / "contrib" / "grafana" / "pctop.json"
# What Grafana puts in for its variables: every host and VM, and a window of 4 scrapes.
GRAFANA_VARS = {"$__rate_interval": "2s", "$__interval": "500ms", "$instance": ".*", "$vm": ".*",
                "${DS_PROMETHEUS}": "prometheus"}


@dataclass
class Fleet:
    prom: Prometheus
    src: str  # instance labels: host:port of each exporter
    dst: str
    src_pid: int
    dst_pid: int
    start: float  # the migration ran within [start, end]
    end: float


def _need_all() -> None:
    need_root()
    need_prometheus()
    why = can_make_netns()
    if why:
        pytest.skip(why)
    from pctop.qemu.launch import qemu_unavailable_reason
    from pctop.sources.ebpf import ebpf_unavailable_reason

    for why in (qemu_unavailable_reason("kvm" if os.path.exists("/dev/kvm") else "tcg"), ebpf_unavailable_reason()):
        if why:
            pytest.skip(why)


@pytest.fixture(scope="module")
def fleet():
    _need_all()
    from pctop.qemu.migration import MIB, MigrationSettings, QemuMigration

    n = 2 * (os.getpid() % 120) + 10  # link subnets no other test process uses
    port = free_port()
    with HostNs("s", n) as src_host, HostNs("d", n + 1) as dst_host:
        src, dst = f"{src_host.addr}:{port}", f"{dst_host.addr}:{port}"
        with prometheus({"pctop": [src, dst]}) as prom:
            accel = "kvm" if os.path.exists("/dev/kvm") else "tcg"
            mig = QemuMigration(MigrationSettings(accel=accel, vcpus=2, region_mib=8, postcopy_bandwidth=2 * MIB))
            try:
                mig.boot()
                s, d = mig.pair.source, mig.pair.destination
                # each host knows only its own QEMU, as on two real hosts
                with exporter("export", "--no-ebpf", "-p", str(s.pid), "--qmp-source", s.qmp_path,
                              "--interval", "0.25", "--listen", src, netns=src_host.ns), \
                        exporter("export", "-p", str(d.pid), "--qmp", d.qmp_path,
                                 "--interval", "0.25", "--listen", dst, netns=dst_host.ns):
                    prom.wait("up == 1", lambda r: len(r) == 2, what="both exporters up")
                    start = time.time()
                    mig.run()
                    # the last intervals of the migration reach Prometheus
                    prom.wait('pctop_qemu_migration_status{status="completed"} == 1',
                              lambda r: len(r) == 2, what="both QEMUs completed")
                    time.sleep(1.0)
                    yield Fleet(prom, src, dst, s.pid, d.pid, start - 1, time.time())
            finally:
                mig.close()


def _range(fleet: Fleet, expr: str) -> list[dict]:
    return fleet.prom.api("query_range", query=expr, start=f"{fleet.start:.3f}", end=f"{fleet.end:.3f}",
                          step="0.5")["result"]


def test_one_prometheus_holds_both_hosts(fleet):
    builds = {r["metric"]["instance"] for r in _range(fleet, "pctop_build_info")}
    assert builds == {fleet.src, fleet.dst}
    tiers = {r["metric"]["instance"]: r["metric"]["tier"] for r in _range(fleet, "pctop_probe_info")}
    assert tiers == {fleet.src: "procfs", fleet.dst: "ebpf"}
    # each host watches its own QEMU
    # each host watches its own QEMU, named by its -name (tests start them as pctop-source/-destination)
    seen = {(r["metric"]["instance"], r["metric"]["pid"], r["metric"]["vm"])
            for r in _range(fleet, "pctop_handler_cpu_seconds_total")}
    assert {(fleet.src, str(fleet.src_pid), "pctop-source"),
            (fleet.dst, str(fleet.dst_pid), "pctop-destination")} <= seen


def test_the_migration_is_seen_from_both_ends(fleet):
    roles = {(r["metric"]["instance"], r["metric"]["pid"], r["metric"]["role"])
             for r in _range(fleet, "pctop_qemu_migration_status")}
    assert roles == {(fleet.dst, str(fleet.dst_pid), "destination"), (fleet.src, str(fleet.src_pid), "source")}
    statuses = {(r["metric"]["role"], r["metric"]["status"])
                for r in _range(fleet, "pctop_qemu_migration_status == 1")}
    assert {("destination", "postcopy-active"), ("source", "postcopy-active"),
            ("destination", "completed"), ("source", "completed")} <= statuses
    # the destination's vCPUs stalled on post-copy faults, measured by the probes
    (faults,) = fleet.prom.query(f'sum(max_over_time(pctop_vcpu_stall_faults_total{{instance="{fleet.dst}",'
                                 f'vcpu!="other"}}[1h]))', at=fleet.end)
    assert float(faults["value"][1]) > 0
    # the source's RAM counters, from the source host: post-copy requests and a finished progress
    (req,) = fleet.prom.query(f'max(max_over_time(pctop_qemu_postcopy_requests{{instance="{fleet.src}"}}[1h]))',
                              at=fleet.end)
    assert float(req["value"][1]) > 0
    (progress,) = fleet.prom.query(f'max(max_over_time(pctop_migration_progress_ratio{{instance="{fleet.src}"}}[1h]))',
                                   at=fleet.end)
    assert float(progress["value"][1]) == 1


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []
    for p in dash["panels"]:
        for t in p.get("targets", ()):
            exprs.append((p["title"], t["expr"]))
    return exprs


def _grafana(expr: str) -> str:
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def test_the_dashboard_is_a_provisionable_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}" and p["targets"], p["title"]
    from tests.system.test_export_rules import exposed_names
    used = set(re.findall(r"\bpctop_[a-z0-9_]+", DASHBOARD.read_text()))
    assert used <= exposed_names(), used - exposed_names()


@pytest.mark.parametrize("title, expr", _dashboard_exprs())
def test_every_dashboard_query_returns_data_from_the_migration(fleet, title, expr):
    result = _range(fleet, _grafana(expr))
    assert result, f"{title}: {expr} returned no data"


def test_the_dashboard_variables_find_both_hosts_and_the_vms(fleet):
    dash = json.loads(DASHBOARD.read_text())
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["definition"])
        values = {r["metric"].get(m.group(2)) for r in _range(fleet, _grafana(m.group(1)))}
        assert None not in values and values, var["name"]
        if var["name"] == "instance":
            assert values == {fleet.src, fleet.dst}
