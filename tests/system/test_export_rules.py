"""contrib/prometheus/alerts.yml: valid for Prometheus's promtool, its unit tests pass, and it
names only metrics pctop serves. (Its evaluation on real scraped data is in
tests/system/test_export_prometheus.py.)"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from pctop.export.metrics import METRICS
from tests.conftest import ROOT

RULES = ROOT / "contrib" / "prometheus"


def exposed_names() -> set[str]:
    """Every sample name the exporter can serve."""
    names = set()
    for m in METRICS.values():
        names.add(m.full)
        if m.kind == "histogram":
            names |= {m.full + s for s in ("_bucket", "_sum", "_count")}
    return names


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool missing (Debian package prometheus; make setup installs it)")
    return path


def test_promtool_check_rules_passes():
    r = subprocess.run([_promtool(), "check", "rules", "alerts.yml"], cwd=RULES, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS: 7 rules found" in r.stdout, r.stdout + r.stderr


def test_promtool_test_rules_passes():
    r = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=RULES, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_is_unit_tested_firing():
    alerts = set(re.findall(r"- alert: (\w+)", (RULES / "alerts.yml").read_text()))
    tests = (RULES / "alerts_test.yml").read_text()
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", tests))
    assert alerts and firing == alerts


def test_the_rules_name_only_metrics_pctop_serves():
    used = set(re.findall(r"\bpctop_[a-z0-9_]+", (RULES / "alerts.yml").read_text()))
    assert used and used <= exposed_names(), used - exposed_names()
