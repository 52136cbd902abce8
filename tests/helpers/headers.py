"""The stream headers (pctop.model.Header) the unit tests share: a live one, with the
eBPF probes and an engine, and a degraded one, /proc only, saying what is missing."""

from __future__ import annotations

from pctop.model import Header, ProbeTier

LIVE = Header(host="h", kernel="k", probe_tier=ProbeTier.EBPF, sources=("engine",), started=1.7e9)
DEGRADED = Header(host="h", kernel="k", probe_tier=ProbeTier.PROCFS, sources=("engine", "procfs"),
                  missing=("ebpf: disabled by --no-ebpf; per-vCPU ...", "debugfs: not mounted"),
                  started=1.0, pctop_version="9.9.9")
