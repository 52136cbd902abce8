"""A real Prometheus for the exporter's tests (Debian's `prometheus`, installed by setup).

`prometheus(targets)` starts it on a free loopback port with its own temporary storage,
scraping the given `host:port` targets every 0.5 s, waits until it is ready, and always
stops it and removes its files afterwards. Queries go through its HTTP API.
`exporter(*args)` runs `pctop export` (or another pctop command given with --export) and
yields the metrics address it printed; it is always stopped too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import pytest

from tests.conftest import ROOT

SCRAPE_S = 0.5


def need_prometheus() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("prometheus missing (Debian package prometheus; make setup installs it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params) -> object:
        q = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query -> its result vector (or matrix, for a range selector)."""
        return self.api("query", query=expr, time=None if at is None else f"{at:.3f}")["result"]

    def targets_up(self) -> list[dict]:
        return [t for t in self.api("targets")["activeTargets"] if t["health"] == "up"]

    def wait(self, expr: str, ok, timeout: float = 30, what: str = "") -> list[dict]:
        """Poll `expr` until ok(result) holds; fail naming `what` after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            res = self.query(expr)
            if ok(res):
                return res
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus: {what or expr} not reached in {timeout} s; last result {res}")
            time.sleep(0.25)


def _config(jobs: dict[str, list[str]], rule_files: list[str]) -> str:
    every = f"{round(SCRAPE_S * 1000)}ms"  # Prometheus takes no fractions ("0.5s")
    lines = ["global:", f"  scrape_interval: {every}", f"  scrape_timeout: {every}",
             f"  evaluation_interval: {every}"]
    if rule_files:
        lines += ["rule_files:"] + [f"  - {json.dumps(f)}" for f in rule_files]
    lines.append("scrape_configs:")
    for job, targets in jobs.items():
        lines += [f"  - job_name: {json.dumps(job)}", "    static_configs:",
                  f"      - targets: {json.dumps(targets)}"]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def prometheus(jobs: dict[str, list[str]], rule_files: list[str] = ()):
    """A running Prometheus scraping `jobs` ({job: [host:port, ...]})."""
    binary = need_prometheus()
    with tempfile.TemporaryDirectory(prefix="pctop-prom-") as tmp:
        cfg = os.path.join(tmp, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write(_config(jobs, list(rule_files)))
        port = free_port()
        log = open(os.path.join(tmp, "log"), "w+")
        p = subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp}/data",
                              f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                             stdout=log, stderr=log, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if p.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"prometheus did not start (exit {p.poll()}): {log.read()[-2000:]}")
                time.sleep(0.1)
            prom = Prometheus(url)
            # Prometheus applies its targets some seconds after it is ready (discovery updates
            # are throttled): wait for the first scrape of each, up or not, so none is missed.
            n = sum(len(t) for t in jobs.values())
            prom.wait("up", lambda r: len(r) == n, what="the first scrape of every target")
            yield prom
        finally:
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            log.close()


METRICS_URL = re.compile(r"serving (http://\S+/metrics)")


@contextlib.contextmanager
def exporter(*args: str, stdout=subprocess.DEVNULL, netns: str | None = None):
    """Run `pctop ARGS` (ARGS must make it serve /metrics, e.g. export --listen 127.0.0.1:0);
    yield (Popen, metrics URL); stop it with SIGTERM (then SIGKILL) however the test ends."""
    cmd = [sys.executable, "-m", "pctop", *args]
    if netns:  # only the network namespace: `ip netns exec` would remount /sys, hiding tracefs
        cmd = ["nsenter", f"--net=/run/netns/{netns}", *cmd]
    p = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = p.stderr.readline()
        m = METRICS_URL.search(line)
        if not m:
            p.kill()
            pytest.fail(f"pctop {' '.join(args)} did not serve: {line}{p.stderr.read()[-2000:]}")
        yield p, m.group(1)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        p.stderr.close()


def scrape(url: str, accept: str | None = None) -> str:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def hostport(url: str) -> str:
    return urllib.parse.urlparse(url).netloc
