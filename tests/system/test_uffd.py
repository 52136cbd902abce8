"""userfaultfd wrapper: ABI numbers pinned, behaviour on real memory.

Needs /dev/userfaultfd or the userfaultfd syscall (root here); skipped
with the reason if the kernel refuses.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import threading

import pytest

from pctop.engine import uffd as U

PAGE = os.sysconf("SC_PAGE_SIZE")


def _uffd_or_skip(**kw) -> U.Uffd:
    try:
        return U.Uffd(**kw)
    except OSError as e:
        pytest.skip(f"userfaultfd unavailable on this machine: {e}")


def test_ioctl_numbers_and_struct_sizes_match_the_kernel_abi():
    assert U.UFFDIO_API == 0xC018AA3F
    assert U.UFFDIO_REGISTER == 0xC020AA00
    assert U.UFFDIO_UNREGISTER == 0x8010AA01
    assert U.UFFDIO_WAKE == 0x8010AA02
    assert U.UFFDIO_COPY == 0xC028AA03
    assert U.UFFDIO_ZEROPAGE == 0xC020AA04
    assert U.USERFAULTFD_IOC_NEW == 0xAA00
    assert ctypes.sizeof(U.UffdioApi) == 24
    assert ctypes.sizeof(U.UffdioRegister) == 32
    assert ctypes.sizeof(U.UffdioCopy) == 40
    assert ctypes.sizeof(U.UffdioZeropage) == 32
    assert U.UFFD_MSG_SIZE == 32
    assert U.UffdioCopy.copy.offset == 32
    assert U.UffdioZeropage.zeropage.offset == 24


def test_msg_parsing_offsets():
    raw = bytearray(64)
    raw[0] = U.UFFD_EVENT_PAGEFAULT
    raw[8:16] = (1).to_bytes(8, "little")
    raw[16:24] = (0x7F0000001000).to_bytes(8, "little")
    raw[24:28] = (4242).to_bytes(4, "little")
    raw[32] = 0x14  # UFFD_EVENT_REMAP: not a page fault, skipped
    assert list(U.iter_faults(bytes(raw))) == [U.FaultMsg(0x7F0000001000, 1, 4242)]


def _toucher(addr: int, out: bytearray, size: int = 8) -> threading.Thread:
    # ctypes.memmove releases the GIL, so the thread can block in the fault
    # while this test's thread resolves it.
    buf = (ctypes.c_char * size).from_buffer(out)
    t = threading.Thread(target=ctypes.memmove, args=(buf, addr, size), daemon=True)
    t.start()
    return t


def test_fault_blocks_until_copy_and_copy_wakes():
    with _uffd_or_skip() as uf, U.AnonMemory(4 * PAGE) as mem, U.AnonMemory(PAGE) as src:
        ioctls = uf.register(mem.addr, mem.size)
        assert ioctls & U.UFFD_IOCTL_COPY and ioctls & U.UFFD_IOCTL_WAKE
        ctypes.memset(src.addr, 0xAB, PAGE)
        out = bytearray(8)
        t = _toucher(mem.addr + 2 * PAGE + 100, out)
        assert uf.wait(10.0), "no fault message arrived"
        msgs = uf.read_faults()
        assert len(msgs) == 1
        assert msgs[0].address & ~(PAGE - 1) == mem.addr + 2 * PAGE
        assert msgs[0].ptid == t.native_id  # THREAD_ID negotiated by default
        info = U.read_fdinfo(os.getpid(), uf.fd)
        assert info.pending == 0 and info.total == 1  # read, thread still asleep
        assert info.features & U.UFFD_FEATURE_THREAD_ID
        assert t.is_alive() and out == bytearray(8)
        assert uf.copy(mem.addr + 2 * PAGE, src.addr, PAGE) == PAGE
        t.join(10)
        assert not t.is_alive()
        assert out == b"\xab" * 8
        # Installing the same page again is a race the engine must count: EEXIST.
        assert uf.copy(mem.addr + 2 * PAGE, src.addr, PAGE) == -errno.EEXIST


def test_copy_dontwake_then_wake():
    with _uffd_or_skip() as uf, U.AnonMemory(PAGE) as mem, U.AnonMemory(PAGE) as src:
        uf.register(mem.addr, mem.size)
        ctypes.memset(src.addr, 0x5A, PAGE)
        out = bytearray(8)
        t = _toucher(mem.addr, out)
        assert uf.wait(10.0)
        assert len(uf.read_faults()) == 1
        assert uf.copy(mem.addr, src.addr, PAGE, dontwake=True) == PAGE
        # The page is present but nobody woke the sleeper: still counted in total.
        assert U.read_fdinfo(os.getpid(), uf.fd).total == 1
        assert t.is_alive()
        uf.wake(mem.addr, PAGE)
        t.join(10)
        assert not t.is_alive() and out == b"\x5a" * 8


def test_zeropage_and_pending_gauge_before_read():
    with _uffd_or_skip() as uf, U.AnonMemory(PAGE) as mem:
        uf.register(mem.addr, mem.size)
        out = bytearray(b"\xff" * 8)
        t = _toucher(mem.addr, out)
        assert uf.wait(10.0)
        assert U.read_fdinfo(os.getpid(), uf.fd).pending == 1  # queued, not read
        assert uf.zeropage(mem.addr, PAGE) == PAGE
        t.join(10)
        assert not t.is_alive() and out == bytearray(8)
        assert uf.zeropage(mem.addr, PAGE) == -errno.EEXIST


def test_copy_range_skips_present_pages_and_counts_them():
    n = 8
    with _uffd_or_skip() as uf, U.AnonMemory(n * PAGE) as mem, U.AnonMemory(n * PAGE) as src:
        uf.register(mem.addr, mem.size)
        for i in range(n):
            ctypes.memset(src.addr + i * PAGE, i + 1, PAGE)
        assert uf.copy(mem.addr + 3 * PAGE, src.addr + 3 * PAGE, PAGE) == PAGE
        assert uf.copy(mem.addr + 6 * PAGE, src.addr + 6 * PAGE, PAGE) == PAGE
        installed, skipped = uf.copy_range(mem.addr, src.addr, n * PAGE, PAGE)
        assert (installed, skipped) == ((n - 2) * PAGE, 2)
        got = ctypes.string_at(mem.addr, n * PAGE)
        assert all(got[i * PAGE] == i + 1 for i in range(n))
        uf.unregister(mem.addr, mem.size)


def test_unregister_makes_faults_ordinary():
    with _uffd_or_skip() as uf, U.AnonMemory(PAGE) as mem:
        uf.register(mem.addr, mem.size)
        uf.unregister(mem.addr, mem.size)
        assert ctypes.string_at(mem.addr, 8) == bytes(8)  # no uffd: plain zero fill


def test_sigbus_feature_delivers_sigbus_instead_of_blocking():
    # In a child: with SIGBUS negotiated a fault must kill it with SIGBUS, not block.
    code = (
        "import ctypes\n"
        "from pctop.engine import uffd as U\n"
        "uf = U.Uffd(sigbus=True)\n"
        "m = U.AnonMemory(4096)\n"
        "uf.register(m.addr, 4096)\n"
        "assert U.read_fdinfo('self', uf.fd).features & U.UFFD_FEATURE_SIGBUS\n"
        "ctypes.memset(m.addr, 1, 8)\n"
    )
    _uffd_or_skip().close()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert p.returncode == -signal.SIGBUS, p.stderr.decode()


def test_fdinfo_parses_redirected_proc_root(tmp_path):
    d = tmp_path / "77" / "fdinfo"
    d.mkdir(parents=True)
    (d / "5").write_text("pos:\t0\nflags:\t02004002\nmnt_id:\t15\nino:\t1057\n"
                         "pending:\t3\ntotal:\t7\nAPI:\taa:180:c000000000000001c\n")
    (d / "6").write_text("pos:\t0\nflags:\t02\n")
    assert U.read_fdinfo(77, 5, proc_root=str(tmp_path)) == U.UffdFdinfo(3, 7, 0x180)
    with pytest.raises(ValueError):
        U.read_fdinfo(77, 6, proc_root=str(tmp_path))
