"""`pctop demo` from the command line: JSON Lines contract, exit codes, usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PCTOP = [sys.executable, "-m", "pctop"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(PCTOP + ["demo", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,needle", [
    (["--memory", "12X"], "--memory"),
    (["--vcpus", "0"], "--vcpus"),
    (["--strategy", "magic"], "--strategy"),
    (["--write-ratio", "2"], "--write-ratio"),
    (["--memory", "1000"], "multiple of 4K"),
    (["--bandwidth", "fast"], "--bandwidth"),
    # More than any test machine holds: refused before a process allocates it.
    (["--memory", "1000T", "--headless"], "available"),
    # Options that would be ignored are refused, not ignored.
    (["--vmm", "qemu", "--vcpus", "4"], "--vcpus: not for --vmm qemu"),
    (["--accel", "tcg"], "--accel is for --vmm qemu"),
])
def test_bad_values_are_one_line_exit_2(args, needle):
    p = _run(*args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pctop demo: error:") and needle in lines[0]
    assert "Traceback" not in p.stderr


def _json_run(*args: str) -> tuple[int, list[dict], str]:
    p = _run("--headless", "--json", "--control", "", *args)
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert lines, p.stderr
    return p.returncode, lines, p.stderr


def test_json_lines_end_with_the_summary_contract(tmp_path):
    rc, lines, err = _json_run("--memory", "32M", "--vcpus", "2", "--workload", "threads",
                               "--bandwidth", "16M", "--no-background", "--pattern", "seq")
    assert rc == 0, err
    assert "workload: threads" in err
    # The header every pctop JSON Lines stream starts with, then the engine's lines.
    assert lines[0]["type"] == "header" and lines[0]["probe_tier"] == "none" and lines[0]["sources"] == ["engine"]
    assert lines[0]["schema"] >= 1 and lines[1]["type"] == "start" and lines[0]["pid"] == lines[1]["pid"]
    s = lines[-1]
    assert s["type"] == "summary" and all(x["type"] in ("start", "progress") for x in lines[1:-1])
    for key in ("strategy", "vcpus", "pages_total", "pages_verified", "mismatches", "faults_total",
                "faults_per_vcpu", "stall_ns_per_vcpu", "pages_demand", "pages_background", "fault_rate",
                "address_source", "workload"):
        assert key in s, key
    assert (s["workload"], s["strategy"], s["vcpus"], s["mismatches"]) == ("threads", "uffd", 2, 0)
    assert s["pages_verified"] == s["pages_total"] == 8192 == s["pages_demand"]
    assert s["fault_rate"] > 0 and s["faults_total"] == 8192


@pytest.mark.kvm
@pytest.mark.parametrize("strategy", ["uffd", "sharded", "vcpu-exit"])
def test_cli_kvm_256mib_run_verifies(strategy):
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm missing or not accessible")
    rc, lines, err = _json_run("--memory", "256M", "--vcpus", "2", "--strategy", strategy,
                               "--bandwidth", "0", "--workload", "kvm")
    s = lines[-1]
    assert rc == 0, err
    assert s["workload"] == "kvm" and s["mismatches"] == 0 and s["pages_verified"] == s["pages_total"] == 65536
    expected = {"vcpu-exit": "guest-assisted"}.get(strategy, "uffd")
    assert s["address_source"] in (expected, "memory_fault")


def test_cli_corrupted_page_exits_1_and_lists_it():
    rc, lines, err = _json_run("--memory", "8M", "--vcpus", "1", "--workload", "threads", "--corrupt-page", "5",
                               "--bandwidth", "0")
    s = lines[-1]
    assert rc == 1
    assert s["mismatches"] == 1 and s["mismatch_list"][0][0] == 5 and not s["ok"]


def test_source_child_without_memory_says_so_in_one_line(tmp_path):
    # The demo checks memory first; should the source still fail to allocate (the host's
    # memory went meanwhile), it says so in one line and its parent names the exit.
    p = subprocess.run([sys.executable, "-m", "pctop.engine.page_server", "--npages", str(1 << 40),
                        "--listen", f"unix:{tmp_path}/s.sock"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    mib = (1 << 40) * 4096 >> 20
    assert p.stderr.strip().splitlines() == [f"pctop engine source: error: cannot hold a {mib} MiB image in memory"]


def test_text_summary_says_which_stall_it_reports():
    p = _run("--headless", "--control", "", "--memory", "16M", "--vcpus", "1", "--workload", "threads",
             "--bandwidth", "0")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("verified: 4096/4096 pages")
    stall = next(ln for ln in lines if "stall" in ln)
    assert stall.startswith("engine stall (fault seen by the engine -> page installed) ms per vCPU [")
    assert "p50" in stall and "p99" in stall and "the dashboard's stall (eBPF: fault -> vCPU running again)" in stall


def test_control_in_a_missing_folder_is_bad_input_and_creates_nothing(tmp_path):
    where = tmp_path / "no" / "such" / "dir"
    p = _run("--headless", "--control", str(where / "engine.sock"))
    assert p.returncode == 2
    assert p.stderr == f"pctop demo: error: --control {where}/engine.sock: the folder {where} does not exist\n"
    assert not (tmp_path / "no").exists()
