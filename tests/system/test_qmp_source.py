"""The QMP source against real (TCG) QEMUs that are not migrating, the boot sector
checked by an independent disassembler, and the pure helpers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from pctop.model import MigrationState
from pctop.qemu import control
from pctop.qemu.guest import LOAD_ADDR, MAILBOX_GPA, MB_PASSES, SECTOR, build_boot_sector
from pctop.qemu.launch import QemuConfig, QemuPair
from pctop.qemu.qmp import QmpError
from pctop.sources.qmp import QmpSource, blocktime_growth, migration_info
from tests.conftest import need_qemu, run_pctop

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pair(request):
    need_qemu()
    # Unnamed threads: identities must come from QEMU's word, not thread names.
    p = QemuPair(QemuConfig(accel="tcg", name_threads=False, region_size=1 << 20))
    request.addfinalizer(p.stop)
    return p.start()


def test_qmp_source_names_the_qemu_and_its_vcpu_thread(pair):
    src = QmpSource(pair.destination.qmp_path, pair.source.qmp_path)
    src.start()
    try:
        r = src.collect()
    finally:
        src.close()
    assert {t.pid for t in r.targets} == {pair.destination.pid, pair.source.pid}
    by_pid = {m.pid: m for m in r.migrations}
    assert by_pid[pair.destination.pid].extra["role"] == "destination"
    assert by_pid[pair.source.pid].extra["role"] == "source"
    assert by_pid[pair.source.pid].state == "none"
    for qp in (pair.source, pair.destination):
        tids = os.listdir(f"/proc/{qp.pid}/task")
        (ident,) = [i for i in r.identities if i.pid == qp.pid]
        assert ident.vcpu == 0 and ident.how == "qmp" and str(ident.tid) in tids
        with open(f"/proc/{qp.pid}/task/{ident.tid}/comm") as f:
            assert f.read().strip() == "qemu-system-x86"  # not named: QEMU's word was needed


def test_qmp_source_refuses_the_same_qemu_twice_and_missing_sockets(pair):
    with pytest.raises(QmpError, match="same QEMU"):
        QmpSource(pair.source.qmp_path, pair.source.control_path).start()
    with pytest.raises(QmpError, match="does not exist"):
        QmpSource("/nonexistent/qmp.sock").start()


def test_qmp_source_reports_a_qemu_that_exits(request):
    need_qemu()
    p = QemuPair(QemuConfig(accel="tcg", region_size=1 << 20))
    request.addfinalizer(p.stop)
    p.start()
    src = QmpSource(p.destination.qmp_path)
    src.start()
    try:
        assert src.collect().targets
        p.destination.proc.terminate()
        p.destination.proc.wait(10)
        r = src.collect()
    finally:
        src.close()
    assert r.gone == (p.destination.pid,)
    assert any("lost QEMU destination" in e for e in r.events)


def test_monitor_json_with_qmp_shows_both_qemus(pair):
    r = run_pctop("monitor", "--json", "--no-ebpf", "--count", "2", "--interval", "0.2",
                  "--qmp", pair.destination.qmp_path, "--qmp", pair.source.qmp_path)
    assert r.returncode == 0, r.stderr
    header, *samples = [json.loads(x) for x in r.stdout.splitlines()]
    assert "qmp" in header["sources"]
    targets = {t["pid"]: t for t in samples[-1]["targets"]}
    assert targets[pair.destination.pid]["migration"]["extra"]["role"] == "destination"
    assert targets[pair.source.pid]["migration"]["source"] == "qmp"


def test_monitor_qmp_errors_are_one_line_exit_2_or_1(pair):
    # Bad input is 2; a socket that is not there is an unavailable target, 1 (README "How runs end").
    for args, says, status in [(("--qmp", "/nonexistent.sock"), "does not exist", 1),
                               (("--qmp", "a", "--qmp", "b", "--qmp", "c"), "at most two", 2)]:
        r = run_pctop("monitor", "--json", "--no-ebpf", "--count", "1", *args)
        assert r.returncode == status and says in r.stderr and r.stderr.count("\n") == 1, r.stderr


# ---- the boot sector ---------------------------------------------------------------------------

def _objdump_lengths(code: bytes, arch: str, vma: int, path) -> list[tuple[int, int]]:
    """(offset, length) of each instruction as objdump decodes `code`."""
    path.write_bytes(code)  # objdump needs a file it can seek in
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-m", arch, "--insn-width=16",
                          f"--adjust-vma={vma:#x}", str(path)], capture_output=True, check=True).stdout.decode()
    return [(int(m.group(1), 16) - vma, len(m.group(2).split()))
            for m in re.finditer(r"^\s*([0-9a-f]+):\t((?:[0-9a-f]{2} )+)", out, re.M)]


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils) to decode the sector")
@pytest.mark.parametrize("vcpus", [1, 2])
def test_boot_sector_decodes_to_the_listed_instructions(tmp_path, vcpus):
    """An independent disassembler finds the same instruction boundaries as the listing,
    in real mode up to the far jump and in 32-bit mode after it."""
    img = build_boot_sector(vcpus=vcpus)
    assert len(img.sector) == SECTOR and img.sector[-2:] == b"\x55\xaa"
    rows = [(int(line[:4], 16), bytes.fromhex(line[6:38].replace(" ", "")), line[39:])
            for line in img.listing.splitlines()]
    code = [r for r in rows if not r[2].startswith(("gdt[", "gdt_desc:", "nop"))]
    assert img.sector.startswith(b"".join(d for _, d, _ in rows))
    split = next(i for i, r in enumerate(code) if r[2].startswith("jmp 0x8:")) + 1
    for part, arch in ((code[:split], "i8086"), (code[split:], "i386")):
        base = part[0][0]
        decoded = _objdump_lengths(b"".join(d for _, d, _ in part), arch, LOAD_ADDR + base, tmp_path / arch)
        assert decoded == [(off - base, len(d)) for off, d, _ in part]


def test_boot_sector_region_and_dirtied_pages():
    img = build_boot_sector(region_base=2 << 20, region_size=1 << 20)
    assert len(img.dirtied_pages()) == 256 + 1
    assert MAILBOX_GPA // 4096 in img.dirtied_pages() and (2 << 20) // 4096 in img.dirtied_pages()
    for bad in [dict(region_base=4097), dict(region_size=0), dict(region_base=0x1000),
                dict(region_size=3 * 4096, vcpus=2), dict(vcpus=0)]:
        with pytest.raises(ValueError):
            build_boot_sector(**bad)


def test_guest_writes_its_region_on_a_real_qemu(pair):
    """The pass count and the first dword of region pages, read from the running source."""
    from pctop.qemu.qmp import QmpConnection

    with QmpConnection(pair.source.control_path) as conn:
        base = pair.guest.region_base
        last = base + pair.guest.region_size - 4096
        a = control.read_guest_u32(conn, MAILBOX_GPA + MB_PASSES)
        first_page, last_page = control.read_guest_u32(conn, base), control.read_guest_u32(conn, last)
        b = control.read_guest_u32(conn, MAILBOX_GPA + MB_PASSES)
        assert 0 < a <= b
        assert a - 1 <= first_page <= b and a - 1 <= last_page <= b


# ---- pure helpers -------------------------------------------------------------------------------

def test_blocktime_growth_per_interval():
    assert blocktime_growth([5, 7], None) == [5.0, 7.0]
    assert blocktime_growth([9, 7, 3], [5, 7]) == [4.0, 0.0, 3.0]   # a vCPU QEMU listed later
    assert blocktime_growth([2], [5]) == [0.0]                      # a new migration: never negative
    assert blocktime_growth(None, [5]) == []


def test_state_words_cover_qemus_postcopy_states():
    for qemu, word in [("active", "precopy"), ("postcopy-active", "postcopy"), ("postcopy-paused", "paused"),
                       ("postcopy-recover", "recovering"), ("completed", "completed"), ("failed", "failed")]:
        assert control.state_word(qemu) == word
    assert control.state_word(None) is MigrationState.NONE
    # A status newer than pctop: unknown, while QEMU's own word stays in extra.qemu_status
    assert control.state_word("some-future-state") is MigrationState.UNKNOWN
    mi = migration_info(7, "destination", {"status": "some-future-state"}, None)
    assert (mi.state, mi.extra["qemu_status"]) == (MigrationState.UNKNOWN, "some-future-state")
