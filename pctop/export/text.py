"""The exposition formats, written directly: Prometheus text 0.0.4 and OpenMetrics 1.0.

prometheus_client's generic renderer builds an object per sample and escapes every label
of every line: 290 ms of CPU for the 70k series of 8 VMs x 256 vCPUs (bench/RESULTS.md),
against a budget of 50 ms. Here each series' label string is built once when the series
is made (pctop/export/collector.py keeps it) and a line is one f-string. The tests parse
the output with prometheus_client's parsers (text, and the strict OpenMetrics one),
promtool and a real Prometheus; prometheus_client is needed by the tests only.

The two formats differ only in a family's name and type for counters (OpenMetrics names
the family without `_total`) and infos (OpenMetrics has an `info` type; text calls it a
gauge named `..._info`), HELP escaping, and OpenMetrics' closing `# EOF`.
"""

from __future__ import annotations

import math

from pctop.export.metrics import METRICS

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

__all__ = ["TEXT_CONTENT_TYPE", "OPENMETRICS_CONTENT_TYPE", "label_string", "number", "Exposition"]


def _escape_value(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def label_string(names, values) -> str:
    """`a="1",b="x"`: the inside of a series' braces."""
    return ",".join(f'{n}="{_escape_value(str(v))}"' for n, v in zip(names, values))


def number(v) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class Exposition:
    """One scrape's body, family by family."""

    def __init__(self, openmetrics: bool = False) -> None:
        self.openmetrics = openmetrics
        self.parts: list[str] = []

    def family(self, key: str) -> str:
        """Write the HELP and TYPE lines of METRICS[key]; returns the sample name."""
        m = METRICS[key]
        name, kind, text = m.full, m.kind, m.help.replace("\\", r"\\").replace("\n", r"\n")
        if self.openmetrics:
            if kind == "counter":
                name = name.removesuffix("_total")
            elif kind == "info":
                name = name.removesuffix("_info")
            text = text.replace('"', r'\"')
        elif kind == "info":
            kind = "gauge"
        self.parts.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")
        return m.full

    def sample(self, name: str, labels: str, value) -> None:
        self.parts.append(f"{name}{{{labels}}} {number(value)}\n" if labels else f"{name} {number(value)}\n")

    def body(self) -> bytes:
        if self.openmetrics:
            self.parts.append("# EOF\n")
        return "".join(self.parts).encode()
