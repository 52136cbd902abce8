"""Helpers of the tests that check the eBPF probes against real programs: build a C
program of tests/programs, run it inside one interval of an EbpfSource, and compare
counts. The fixtures that use them are in tests/system/conftest.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from pctop.probe_build import task_pt_regs_usable
from pctop.sources.ebpf import EbpfSource, ebpf_unavailable_reason
from pctop.sources.readings import Reading, ThreadFaults, UffdCounters
from tests.conftest import ROOT

PROGRAMS = ROOT / "tests" / "programs"
T = TypeVar("T")


def need_ebpf() -> None:
    why = ebpf_unavailable_reason()
    if why:
        pytest.skip(f"eBPF unavailable: {why}")


def need_task_pt_regs() -> None:
    """Skip where the probes cannot take read()'s arguments at its exit."""
    if not task_pt_regs_usable():
        pytest.skip("no bpf_task_pt_regs for the probes here (needs x86-64, kernel 5.15 and /sys/kernel/btf/vmlinux)")


@contextmanager
def running_probes(*args, **kw) -> Iterator[EbpfSource]:
    """An EbpfSource(*args, **kw), started (skipping where eBPF is unavailable), closed after."""
    need_ebpf()
    src = EbpfSource(*args, **kw)
    src.start()
    try:
        yield src
    finally:
        src.close()


def build_program(tmp_path_factory, name: str) -> Path:
    """Compile tests/programs/<name>.c with gcc into a temporary folder."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip(f"gcc not installed (needed to build tests/programs/{name}.c)")
    out = tmp_path_factory.mktemp("programs") / name
    subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-pthread", "-o", str(out), str(PROGRAMS / f"{name}.c")],
                   check=True)
    return out


def debug_delta(src: EbpfSource, before: dict[str, int]) -> dict[str, int]:
    """The probes' debug counters that moved since `before` (the races they named), by how much."""
    after = src.debug_counters()
    return {k: v - before[k] for k, v in after.items() if v != before[k]}


def in_one_interval(src: EbpfSource, run: Callable[[], T]) -> tuple[T, Reading, dict[str, int]]:
    """run() inside one interval of `src`: its result, the probes' reading of that
    interval, and their debug counters' changes meanwhile (debug_delta)."""
    src.collect()  # everything before belongs to the previous interval
    before = src.debug_counters()
    result = run()
    r = src.collect()
    return result, r, debug_delta(src, before)


def run_toucher(src: EbpfSource, toucher: Path, *args: str) -> tuple[dict, Reading]:
    """Run the program to completion inside one interval of `src`."""
    src.collect()  # everything before belongs to the previous interval
    p = subprocess.run([str(toucher), *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), src.collect()


def run_toucher_named(src: EbpfSource, toucher: Path, *args: str) -> tuple[dict, Reading]:
    """Start the program (-w: it registers its uffd, then waits), name its pid to
    `src` (what it set up is read from /proc), then let it run to completion."""
    p = subprocess.Popen([str(toucher), *args, "-w"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = p.stdout.readline().split()
        assert ready and ready[0] == "ready", ready
        src.add_pid(int(ready[1]))
        src.collect()
        p.stdin.write("go\n")
        p.stdin.flush()
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return json.loads(out), src.collect()


def threads_of(r: Reading, pid: int) -> dict[int, ThreadFaults]:
    return {t.tid: t for t in r.threads if t.pid == pid}


def assert_same_count(got: int, truth: int, allowed_races: int, what: str) -> None:
    """pctop's count equals the truth, or falls short by at most the named races the probes
    counted meanwhile (their debug counters) and by at most 0.1 %."""
    short = truth - got
    assert short >= 0, f"{what}: pctop counted {got}, more than the {truth} that happened"
    assert short <= allowed_races and short <= truth // 1000, \
        f"{what}: pctop {got} vs {truth}: {short} short, named races only {allowed_races}"


def uffd_of(r: Reading, pid: int, fd: int) -> UffdCounters:
    found = [u for u in r.uffds if u.pid == pid and u.fd == fd]
    assert found, f"no counters for uffd {fd} of pid {pid}: {r.uffds}"
    return found[0]
