"""`pctop monitor --json`, `record`, `replay` as a user runs them (fresh interpreters)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, cli_in_fresh_interpreter, run_pctop
from tests.helpers.probes import need_ebpf
from tests.helpers.uffd_holder import holder


def lines_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_monitor_json_count_prints_a_header_and_that_many_samples_of_a_live_uffd_process():
    with holder(3) as (_, pid, fd):
        r = run_pctop("monitor", "--json", "--count", "2", "--interval", "0.2", "--no-ebpf", "-p", str(pid))
    assert r.returncode == 0, r.stderr
    header, *samples = lines_of(r.stdout)
    assert header["type"] == "header" and header["probe_tier"] == "procfs"
    assert header["schema"] >= 1 and header["host"] and header["kernel"] == os.uname().release
    assert any(m.startswith("ebpf: disabled by --no-ebpf") for m in header["missing"])
    assert len(samples) == 2
    for s in samples:
        assert s["type"] == "sample" and s["probe_tier"] == "procfs" and s["interval_s"] > 0
        (t,) = s["targets"]
        assert t["pid"] == pid and t["comm"]
        (u,) = t["uffds"]
        assert u["fd"] == fd and u["pending_max"] >= 3 and u["total_max"] >= 3
    assert [s["seq"] for s in samples] == [1, 2]


def test_json_path_imports_neither_textual_nor_bcc():
    run = cli_in_fresh_interpreter(["monitor", "--json", "--count", "1", "--interval", "0.1", "--no-ebpf"])
    assert json.loads(run.lines[0])["type"] == "header" and json.loads(run.lines[1])["type"] == "sample"
    assert run.imported == {"textual": False, "bcc": False, "rich": False}


def _wait_lines(path, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n} lines")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_record_ends_cleanly_on_a_signal_and_replay_gives_it_back(tmp_path, sig):
    out = tmp_path / "rec.ndjson"
    with holder(2) as (_, pid, _fd):
        p = subprocess.Popen([sys.executable, "-m", "pctop", "record", "-o", str(out), "--interval", "0.1",
                              "--no-ebpf", "-p", str(pid)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            _wait_lines(out, 4)
            p.send_signal(sig)
            _, err = p.communicate(timeout=20)
        finally:
            p.kill()
            p.wait()
    assert p.returncode == 0 and "Traceback" not in err, err
    text = out.read_text()
    assert text.endswith("\n")
    recorded = lines_of(text)
    assert recorded[0]["type"] == "header" and len(recorded) >= 4
    assert all(d["type"] == "sample" for d in recorded[1:])
    r = run_pctop("replay", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert r.stdout == text  # the same bytes come back


def test_replay_of_a_damaged_file_emits_what_came_before_and_names_the_line(tmp_path):
    rec = tmp_path / "rec.ndjson"
    r = run_pctop("record", "-o", str(rec), "--count", "2", "--interval", "0.1", "--no-ebpf")
    assert r.returncode == 0, r.stderr
    good = rec.read_text()
    rec.write_text(good + good.splitlines()[1][:30])  # a cut-off fourth line
    r = run_pctop("replay", str(rec), "--json")
    assert r.returncode == 2
    assert r.stdout == good
    assert r.stderr.count("\n") == 1 and "line 4" in r.stderr and "truncated" in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["monitor", "--json", "-p", "999999999"], "no process with pid 999999999"),
    (["monitor", "--json", "--engine", "/nonexistent/engine.sock"], "cannot connect"),
    (["monitor", "--json", "--qmp", "/nonexistent.qmp"], "/nonexistent.qmp"),
    (["ctl", "--control", "/nonexistent/engine.sock", "status"], "cannot connect"),
    (["qemu", "--dest", "/nonexistent.qmp", "pause"], "QMP socket /nonexistent.qmp does not exist"),
])
def test_a_target_that_is_not_there_exits_1_whichever_command(args, needle):
    # README "Exit status": an unavailable target is 1 for every command; bad input is 2.
    r = run_pctop(*args, timeout=30)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["monitor", "--json", "--interval", "0"], "--interval"),
    (["monitor", "--json", "--count", "0"], "--count"),
    (["monitor", "--json", "-p", "abc"], "-p"),
    (["record"], "-o"),
    (["record", "-o", "/nonexistent-dir/x.ndjson", "--count", "1"], "cannot write"),
    (["replay", "/nonexistent.ndjson", "--json"], "cannot open"),
    (["monitor", "--page-ranges"], "--page-ranges goes with --json"),
    (["monitor", "--json", "--page-ranges", "--no-ebpf"], "cannot go with --no-ebpf"),
    (["record", "-o", "/nonexistent-dir/x.ndjson", "--page-ranges", "--no-ebpf"], "cannot go with --no-ebpf"),
])
def test_bad_input_is_a_one_line_error_with_exit_2(args, needle):
    r = run_pctop(*args, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and needle in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.bpf
def test_monitor_json_ebpf_tier_when_the_probes_load():
    need_ebpf()
    with holder(2, stream=True) as (_, pid, fd):
        r = run_pctop("monitor", "--json", "--count", "3", "--interval", "0.5", "-p", str(pid), timeout=120)
    assert r.returncode == 0, r.stderr
    header, *samples = lines_of(r.stdout)
    assert header["probe_tier"] == "ebpf" and "ebpf" in header["sources"]
    assert not any(m.startswith("ebpf") for m in header["missing"])
    assert len(samples) == 3 and all(s["probe_tier"] == "ebpf" for s in samples)
    (t,) = samples[-1]["targets"]
    assert t["pid"] == pid
    # Two threads fault steadily: the probes see their stalls and the handler's work.
    faulting = [v for v in t["vcpus"] if v["faults"] > 0]
    assert faulting and all(v["stall_ns"] > 0 and v["p50_us"] is not None and v["max_us"] for v in faulting)
    (u,) = t["uffds"]
    assert u["fd"] == fd and u["msgs_read"] > 0 and u["pages_installed"] > 0
    assert "installed_ranges" not in u and "registered_ranges" not in t  # no --page-ranges


@pytest.mark.bpf
def test_record_page_ranges_shows_which_pages_were_installed_and_replays(tmp_path):
    from pctop.sources.pagemap import PAGE_SHIFT, page_count
    need_ebpf()
    out = tmp_path / "rec.ndjson"
    with holder(2, stream=True) as (_, pid, fd):
        r = run_pctop("record", "-o", str(out), "--page-ranges", "--count", "3", "--interval", "0.5",
                      "-p", str(pid), timeout=120)
    assert r.returncode == 0, r.stderr
    header, *samples = lines_of(out.read_text())
    installed = 0
    for s in samples:
        (t,) = s["targets"]
        (u,) = t["uffds"]
        runs = u["installed_ranges"]
        assert u["page_map_lost"] == 0
        # a page dropped and installed again counts twice in pages_installed, once in the runs
        assert 0 < page_count(runs) <= u["pages_installed"]
        (reg_start, reg_pages), = t["registered_ranges"]  # the holder registers one region
        for start, n in runs:
            assert reg_start <= start and start + (n << PAGE_SHIFT) <= reg_start + (reg_pages << PAGE_SHIFT)
        installed += u["pages_installed"]
    assert installed > 0
    r = run_pctop("replay", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert r.stdout == out.read_text()


def test_replay_json_of_a_file_that_is_not_a_recording_exits_2(tmp_path):
    f = tmp_path / "other.ndjson"
    f.write_text('{"hello": 1}\n')
    r = run_pctop("replay", str(f), "--json")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == f"pctop replay: error: {f}: no header line; not a pctop recording\n"


@pytest.mark.parametrize("content, says", [
    (b"\x7fELF\x02\x01\x01\x00\x00\x00\xff\xfe", "line 1: not UTF-8 text (a binary file?); not a pctop recording"),
    (b'{"type": "header", "host": "h}', "line 1: not valid JSON: unterminated string starting at column 28 "
                                        "(the line is truncated: the recording was cut off)"),
    (b'{"type": "header", "host": "h}\n', "line 1: not valid JSON: invalid control character at column 31"),
    (b'{"type": "header", "host": "h"}\n',
     "line 1: not a valid header record: the header lacks the field(s) kernel, probe_tier, and sources"),
])
def test_replay_errors_say_what_is_wrong_in_the_users_words(tmp_path, content, says):
    f = tmp_path / "bad.ndjson"
    f.write_bytes(content)
    r = run_pctop("replay", str(f), "--json")
    assert r.returncode == 2
    assert r.stderr == f"pctop replay: error: {f}: {says}\n"


def test_monitor_of_a_process_with_nothing_to_measure_says_so(tmp_path):
    import json
    import subprocess
    import sys

    plain = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    assert plain.stdout.readline() == "ready\n"  # running its own program, not pytest's fork
    try:
        r = run_pctop("monitor", "--json", "--no-ebpf", "-p", str(plain.pid), "--count", "2",
                      "--interval", "0.2", timeout=30)
    finally:
        plain.kill()
        plain.wait()
    assert r.returncode == 0, r.stderr
    events = [e["text"] for line in r.stdout.splitlines()[1:] for e in json.loads(line)["events"]]
    hints = [e for e in events if "holds no userfaultfd and no KVM vCPU fd" in e]
    assert hints == [f"procfs: pid {plain.pid} holds no userfaultfd and no KVM vCPU fd: nothing to measure until it "
                     "opens one (is it the VMM, or its uffd handler?)"]  # once, not every interval
