"""A real Prometheus scrapes `pctop monitor --json --export` during a real reference-engine
migration; PromQL over what it stored must equal pctop's own JSON over the same span.

One run per module (about 15 s): the engine migrates 512M with two KVM vCPUs (or threads
where /dev/kvm is missing), pctop watches it through the engine's socket (--no-ebpf keeps the
run short: the exporter is a view and does not care which source measured), Prometheus scrapes
every 0.5 s. The alert rules and the dashboard's queries are checked against the same data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest

from pctop import hist
from pctop.root import stop_child
from tests.conftest import ROOT
from tests.helpers.promserver import Prometheus, exporter, free_port, need_prometheus, prometheus

ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"
ENGINE = ["demo", "--headless", "--json", "--vcpus", "2", "--memory", "512M", "--pattern", "random",
          "--bandwidth", "4M", "--duration", "5"]


@dataclass
class Run:
    prom: Prometheus
    pid: int
    samples: list[dict]  # the monitor's JSON samples
    t1: float  # first scrape that had all the engine's vCPU series
    t2: float  # last one
    seq1: int  # pctop_samples_total at t1 and t2: the JSON samples in (seq1, seq2] are the span
    seq2: int
    summary: dict  # the engine's own summary line


def _raw(prom: Prometheus, expr: str, at: float) -> dict[str, list[tuple[float, float]]]:
    """expr[10m] at `at`: every stored (timestamp, value) per series, keyed by the vcpu label."""
    out = {}
    for r in prom.query(f"{expr}[10m]", at=at):
        out[r["metric"].get("vcpu", "")] = [(float(t), float(v)) for t, v in r["values"]]
    return out


@pytest.fixture(scope="module")
def run():
    need_prometheus()
    port = free_port()  # Prometheus is up and scraping this before the migration starts
    with tempfile.TemporaryDirectory(prefix="pctop-export-") as tmp, \
            prometheus({"pctop": [f"127.0.0.1:{port}"]}, rule_files=[str(ALERTS)]) as prom:
        sock = os.path.join(tmp, "engine.sock")
        eng = subprocess.Popen([sys.executable, "-m", "pctop", *ENGINE, "--control", sock], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            pid = json.loads(eng.stdout.readline())["pid"]
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                assert eng.poll() is None and time.monotonic() < deadline, "the engine never opened its socket"
                time.sleep(0.05)
            out_path = os.path.join(tmp, "monitor.ndjson")
            with open(out_path, "w") as out, \
                    exporter("monitor", "--json", "--export", f"127.0.0.1:{port}", "--no-ebpf", "-p", str(pid),
                             "--engine", sock, "--interval", "0.25", stdout=out) as (mon, _):
                faults = 'pctop_vcpu_stall_faults_total{vcpu!="other"}'
                prom.wait(faults, lambda r: len(r) == 2, what="the engine's two vCPUs")
                summary = json.loads(eng.communicate(timeout=120)[0].splitlines()[-1])
                assert summary["ok"], summary
                # the target leaves /metrics on the scrape after its last interval
                prom.wait(f"count({faults}) or vector(0)", lambda r: r and r[0]["value"][1] == "0",
                          what="the engine's series to end")
                mon.terminate()
                mon.wait(timeout=20)
            now = time.time()
            series = _raw(prom, faults, now)
            # the span: from the first scrape that had every vCPU's series to the last one
            t1 = max(v[0][0] for v in series.values())
            t2 = min(v[-1][0] for v in series.values())
            (seqs,) = _raw(prom, "pctop_samples_total", now).values()
            seq = dict(seqs)
            with open(out_path) as f:
                lines = [json.loads(x) for x in f if x.strip()]
            yield Run(prom, pid, [x for x in lines if x["type"] == "sample"], t1, t2, int(seq[t1]), int(seq[t2]),
                      summary)
        finally:
            stop_child(eng)  # SIGTERM first: a killed engine cannot remove its folder
            eng.stdout.close()


def _json_span(run: Run):
    """Per vCPU index: faults, stall_ns and the merged histogram of the JSON samples in the span."""
    faults, stall, hists = {}, {}, {}
    for s in run.samples:
        if not run.seq1 < s["seq"] <= run.seq2:
            continue
        for t in s["targets"]:
            if t["pid"] != run.pid:
                continue
            for v in t["vcpus"]:
                k = str(v["vcpu"])
                faults[k] = faults.get(k, 0) + v["faults"]
                stall[k] = stall.get(k, 0) + v["stall_ns"]
                hists[k] = hist.merge_counts(hists.get(k, hist.EMPTY), v["hist"])
    return faults, stall, hists


def test_the_span_has_enough_scrapes_and_samples(run):
    assert run.t2 - run.t1 >= 3, "the migration was scraped for less than 3 s"
    assert run.seq2 - run.seq1 >= 8
    assert [s["seq"] for s in run.samples] == list(range(1, len(run.samples) + 1))


def test_increase_of_the_fault_counters_equals_the_json_sums(run):
    faults, stall, _ = _json_span(run)
    # the span saw most of the fault storm (the engine's own count is the ground truth)
    assert sum(faults.values()) > run.summary["faults_total"] / 2, (faults, run.summary["faults_total"])
    rng = f"{round((run.t2 - run.t1) * 1000)}ms"
    # [t2 - R, t2] holds the scrapes at t1 and t2 exactly (a range includes both ends in
    # Prometheus 2.x, Debian 12 has 2.42): increase() does not extrapolate
    got = {r["metric"]["vcpu"]: float(r["value"][1]) for r in run.prom.query(
        f'increase(pctop_vcpu_stall_faults_total{{pid="{run.pid}"}}[{rng}])', at=run.t2)}
    assert got == {k: float(n) for k, n in faults.items()}
    count = {r["metric"]["vcpu"]: float(r["value"][1]) for r in run.prom.query(
        f'increase(pctop_vcpu_stall_seconds_count{{pid="{run.pid}"}}[{rng}])', at=run.t2)}
    assert count == got
    total = run.prom.query(f'sum(increase(pctop_vcpu_stall_faults_total{{pid="{run.pid}"}}[{rng}]))', at=run.t2)
    assert float(total[0]["value"][1]) == sum(faults.values())
    secs = {r["metric"]["vcpu"]: float(r["value"][1]) for r in run.prom.query(
        f'increase(pctop_vcpu_stall_seconds_sum{{pid="{run.pid}"}}[{rng}])', at=run.t2)}
    assert secs == pytest.approx({k: ns / 1e9 for k, ns in stall.items()}, rel=1e-9)


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_histogram_quantile_is_within_one_bucket_of_pctops_percentile(run, q):
    _, _, hists = _json_span(run)
    rng = f"{round((run.t2 - run.t1) * 1000)}ms"
    for vcpu, h in hists.items():
        ours = hist.percentile_us(h, q * 100)
        (r,) = run.prom.query(f'histogram_quantile({q}, sum by (le) (increase('
                              f'pctop_vcpu_stall_seconds_bucket{{pid="{run.pid}",vcpu="{vcpu}"}}[{rng}])))',
                              at=run.t2)
        theirs = float(r["value"][1]) * 1e6
        assert abs(hist.bucket_index(theirs) - hist.bucket_index(ours)) <= 1, (vcpu, q, ours, theirs)


def test_the_alert_rules_load_and_evaluate_on_the_real_series(run):
    groups = run.prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 7 and all(r["health"] == "ok" and not r.get("lastError") for r in rules), rules
    # --no-ebpf: the procfs tier, so "degraded" was pending (its `for` is 5 minutes)
    pending = run.prom.query('ALERTS{alertname="PctopDegraded",alertstate="pending"}', at=run.t2)
    assert len(pending) == 1 and pending[0]["metric"]["tier"] == "procfs"
