"""`pctop export` and `pctop monitor --export` as a user runs them (fresh interpreters, real
sockets, a real uffd process, Prometheus's own promtool)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import run_pctop
from tests.helpers.promserver import exporter, scrape
from tests.helpers.uffd_holder import holder


def _values(text: str, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def _wait_value(url: str, name: str, ok, timeout: float = 20.0) -> str:
    import time
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(url)
        if any(ok(v) for v in _values(text, name).values()):
            return text
        assert time.monotonic() < deadline, f"{name} never satisfied the check:\n{text[-3000:]}"
        time.sleep(0.1)


def test_export_serves_a_live_uffd_process_and_promtool_accepts_it():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing (Debian package prometheus; make setup installs it)")
    with holder(3) as (_, pid, fd):
        with exporter("export", "--no-ebpf", "-p", str(pid), "--interval", "0.2",
                      "--listen", "127.0.0.1:0") as (p, url):
            text = _wait_value(url, "pctop_uffd_pending_faults_max", lambda v: v >= 3)
            labels = dict(next(iter(_values(text, "pctop_uffd_pending_faults_max"))))
            assert labels == {"vm": f"uffdhold{pid}", "pid": str(pid), "fd": str(fd)}
            ((missing, tier),) = _values(text, "pctop_probe_info")
            assert tier == ("tier", "procfs") and "ebpf" in missing[1].split(",")
            r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                               timeout=30)
            assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
            om = scrape(url, accept="application/openmetrics-text; version=1.0.0; charset=utf-8")
            assert om.endswith("# EOF\n")
            names = {f.name for f in om_families(om)}
            assert "pctop_uffd_messages_read" in names and "pctop_build" in names  # OpenMetrics names
        assert p.returncode == 0, p.stderr.read()  # SIGTERM: a clean stop


def test_monitor_json_export_serves_what_it_prints():
    with holder(2) as (_, pid, fd):
        with exporter("monitor", "--json", "--export", "127.0.0.1:0", "--no-ebpf", "-p", str(pid),
                      "--interval", "0.2", "--count", "10", stdout=subprocess.PIPE) as (p, url):
            text = _wait_value(url, "pctop_samples_total", lambda v: v >= 2)
            assert _values(text, "pctop_targets") == {(): 1.0}
            out, _ = p.communicate(timeout=30)
        assert p.returncode == 0
        lines = [json.loads(x) for x in out.splitlines()]
        assert lines[0]["type"] == "header" and len(lines) == 11
        assert lines[1]["targets"][0]["uffds"][0]["fd"] == fd


def test_a_port_in_use_is_a_one_line_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        for args in (["export", "--listen", f"127.0.0.1:{port}"],
                     ["monitor", "--json", "--export", str(port), "--count", "1"]):
            r = run_pctop(*args, "--no-ebpf")
            assert r.returncode == 2, r
            assert r.stderr.count("\n") == 1 and "Address already in use" in r.stderr, r.stderr
            assert r.stdout == ""


@pytest.mark.parametrize("args, needle", [
    (["export", "--listen", "host:port"], "the port must be a number"),
    (["export", "--listen", "::1:9863"], "IPv6 address in brackets"),
    (["export", "--listen", ":9863"], "give an address"),
    (["export", "--listen", "70000"], "within 0..65535"),
    (["export", "--page-ranges"], "--page-ranges is not exported"),
    (["monitor", "--json", "--export", "x:y"], "the port must be a number"),
])
def test_bad_listen_addresses_are_one_line_errors(args, needle):
    r = run_pctop(*args, "--no-ebpf")
    assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_a_non_loopback_address_is_served_with_a_warning():
    with exporter("export", "--no-ebpf", "--interval", "0.2", "--listen", "0.0.0.0:0") as (p, url):
        port = url.rsplit(":", 1)[1].split("/")[0]
        assert "pctop_build_info" in scrape(f"http://127.0.0.1:{port}/metrics")
        p.terminate()
        p.wait(timeout=20)
        assert "not loopback" in p.stderr.read()


def test_other_paths_are_404_and_head_has_no_body():
    import urllib.error
    import urllib.request

    with exporter("export", "--no-ebpf", "--interval", "0.2", "--listen", "127.0.0.1:0") as (_, url):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url.replace("/metrics", "/nothing"), timeout=10)
        assert e.value.code == 404
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert r.read() == b""


def test_the_source_socket_is_given_once():
    r = run_pctop("export", "--no-ebpf", "--qmp", "/nonexistent/d", "--qmp", "/nonexistent/s",
                  "--qmp-source", "/nonexistent/s2")
    assert r.returncode == 2 and "give the source's QMP socket once" in r.stderr and r.stderr.count("\n") == 1


def test_the_dashboard_serves_metrics_while_it_runs():
    """monitor --export with the TUI (in a pty, as a user's terminal): /metrics answers while
    the dashboard shows, and q closes both."""
    import os
    import sys
    import urllib.error

    from tests.helpers.promserver import free_port
    from tests.helpers.term import in_pty, read_until

    port = free_port()
    with holder(2) as (_, pid, fd):
        argv = [sys.executable, "-m", "pctop", "monitor", "--no-ebpf", "-p", str(pid), "--interval", "0.2",
                "--export", f"127.0.0.1:{port}"]
        with in_pty(argv) as (proc, master):
            out = read_until(master, b"DEGRADED", 60)
            assert b"DEGRADED" in out, out[-2000:]
            url = f"http://127.0.0.1:{port}/metrics"
            text = _wait_value(url, "pctop_uffd_pending_faults_max", lambda v: v >= 2)
            assert {dict(k)["fd"] for k in _values(text, "pctop_uffd_pending_faults_max")} == {str(fd)}
            os.write(master, b"q")
            read_until(master, b"\x00never", 1)
            assert proc.wait(30) == 0
            with pytest.raises(urllib.error.URLError):
                scrape(url)  # the endpoint went with the dashboard


def test_export_imports_neither_textual_nor_bcc_nor_prometheus_client():
    """prometheus_client is a test dependency only (pctop/export/text.py writes the formats)."""
    import sys

    from tests.conftest import ROOT
    code = ("import sys, json\n"
            "from pctop.cli import cli\n"
            "try:\n"
            "    cli.main(['export', '--no-ebpf', '--count', '1', '--interval', '0.1', '--listen', '127.0.0.1:0'],"
            " prog_name='pctop', standalone_mode=False)\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(json.dumps(sorted(m for m in ('textual', 'bcc', 'prometheus_client') if m in sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and "serving http://127.0.0.1:" in r.stderr, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
