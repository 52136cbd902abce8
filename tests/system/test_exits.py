"""How runs end, as a user ends them in a terminal: Ctrl+C, SIGTERM, a closed terminal
(SIGHUP), `q`. Whatever ends a run: one line, no traceback, the exit status of
pctop.exits, no process and no temporary folder left behind (README "Exit status")."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from tests.conftest import need_uffd
from tests.helpers.term import Term


@pytest.fixture
def short_tmp():
    """A private TMPDIR with a short path: unix socket paths below it must fit 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="pctop-t-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def stop(t: Term, how: str) -> None:
    if how == "sigterm":
        os.kill(t.proc.pid, signal.SIGTERM)
    elif how == "hangup":
        t.hang_up()
    else:
        t.type({"q": b"q", "ctrl-q": b"\x11", "ctrl-c": b"\x03"}[how])


# Threads and a slow stream: the run outlasts the test, whatever the machine.
SLOW_DEMO = ["demo", "--workload", "threads", "--memory", "256M", "--bandwidth", "2M", "--duration", "60"]


@pytest.mark.parametrize("how,status,word", [
    ("ctrl-c", 130, "interrupted"),
    ("sigterm", 128 + signal.SIGTERM, "ended by SIGTERM"),
    ("hangup", 128 + signal.SIGHUP, "ended by SIGHUP"),
])
def test_headless_demo_ends_cleanly_however_it_is_stopped(short_tmp, how, status, word):
    need_uffd()
    t = Term(SLOW_DEMO + ["--headless"], short_tmp)
    try:
        assert t.read_until(b"postcopy", 60), t.text()[-2000:]
        assert t.seen, "the source runs as a child process"
        stop(t, how)
        assert t.wait(30) == status, t.text()[-2000:]
        procs, files = t.leftovers()
        assert procs == [] and files == []
        if how != "hangup":  # after a hang-up nobody can read the terminal
            text = t.text()
            assert "Traceback" not in text and "Aborted" not in text, text
            last = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()][-1]
            assert last.startswith(f"pctop demo: {word} before the migration finished"), text[-1000:]
            assert "not verified" in last
    finally:
        t.close()


@pytest.mark.parametrize("how,status,line", [
    ("q", 130, "pctop demo: quit before the migration finished; not verified"),
    ("ctrl-q", 130, "pctop demo: quit before the migration finished; not verified"),
    ("ctrl-c", 130, "pctop demo: interrupted"),
    ("sigterm", 128 + signal.SIGTERM, "pctop demo: ended by SIGTERM"),
    ("hangup", 128 + signal.SIGHUP, None),
])
def test_dashboard_demo_ends_cleanly_however_it_is_stopped(short_tmp, how, status, line):
    need_uffd()
    t = Term(SLOW_DEMO, short_tmp)
    try:
        assert t.read_until(b"POSTCOPY", 90), t.text()[-2000:]
        assert len(t.seen) >= 2, "the engine and its source run as child processes"
        stop(t, how)
        assert t.wait(40) == status, t.text()[-2000:]
        procs, files = t.leftovers()
        assert procs == [] and files == []
        if line:
            text = t.text()
            assert "Traceback" not in text and "Aborted" not in text, text[-2000:]
            # After the dashboard has restored the screen, exactly one line.
            tail = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text.rsplit("\x1b[?1049l", 1)[-1])
            assert [ln.strip() for ln in tail.replace("\r", "\n").splitlines() if ln.strip()] == [line]
    finally:
        t.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how,args,status", [
    ("q", [], 130),                                          # the dashboard
    ("ctrl-c", ["--headless"], 130),
    ("hangup", [], 128 + signal.SIGHUP),                     # tmux kill-session, a closed window
])
def test_qemu_demo_in_post_copy_leaves_no_qemu_and_no_folder(short_tmp, how, args, status):
    from tests.conftest import need_qemu, need_root

    need_root()
    need_qemu()
    # A destination QEMU in post-copy ignores SIGTERM (and spins): pctop must kill it.
    t = Term(["demo", "--vmm", "qemu", "--accel", "tcg", "--bandwidth", "256K", *args], short_tmp)
    try:
        assert t.read_until(b"postcopy-active" if args else b"POSTCOPY", 120), t.text()[-2000:]
        qemus = [p for p in t.seen if "qemu" in open(f"/proc/{p}/comm").read()]
        assert len(qemus) == 2
        stop(t, how)
        assert t.wait(30) == status, t.text()[-2000:]
        procs, files = t.leftovers()
        assert procs == [] and files == []
        if how != "hangup":
            text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", t.text())
            assert "Traceback" not in text and "not connected" not in text, text[-2000:]
            assert "pctop demo: stopped before the migration finished, not migrated; stopping both QEMUs" in text
            # Log lines clear the headless progress line instead of running into it.
            assert re.search(r"KiBpctop demo|KiB\rpctop demo", t.text()) is None
    finally:
        t.close()


def test_readme_has_the_exit_status_table_of_pctop_exits():
    from pctop import exits
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## How runs end", 1)[1].split("\n## ", 1)[0]
    for status in (exits.OK, exits.FAILED, exits.USAGE, exits.INTERRUPTED):
        assert f"\n| {status} |" in table
    assert f"| {128 + signal.SIGTERM}, {128 + signal.SIGHUP} |" in table


def test_dashboard_demo_whose_engine_is_killed_says_failed_and_leaves_nothing(short_tmp):
    need_uffd()
    t = Term(SLOW_DEMO, short_tmp)
    try:
        assert t.read_until(b"POSTCOPY", 90), t.text()[-2000:]
        engine = [p for p in t.seen if open(f"/proc/{p}/cmdline").read().split("\0")[2:4] == ["pctop", "demo"]]
        assert len(engine) == 1
        os.kill(engine[0], signal.SIGKILL)  # a crash: nothing of its own cleanup runs
        assert t.read_until(b"demo FAILED (the engine was ended by SIGKILL)", 30), t.text()[-2000:]
        t.type(b"q")
        assert t.wait(30) == 1
        procs, files = t.leftovers()
        assert procs == [] and files == []  # its source child and its folder went too
    finally:
        t.close()
