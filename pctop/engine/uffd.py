"""userfaultfd for the reference engine: open, handshake, register, resolve, read.

Pure Python over ctypes: every blocking call (ioctl, read, memmove) is a
foreign call that releases the GIL, so a thread can sit in a fault while
another thread resolves it (a thread that faults *holding* the GIL would
deadlock the process; see docs/engine-control.md).

Hot-path calls return plain ints (bytes copied or -errno) instead of raising:
an EEXIST race between a demand install and the background stream is normal
and frequent, and an exception per race costs more than the copy.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import struct
from typing import NamedTuple

from pctop.fdinfo import UffdFdinfo, parse_fdinfo  # noqa: F401  (re-exported: read_fdinfo returns it)

# --- ABI facts (include/uapi/linux/userfaultfd.h, x86-64) -------------------

UFFD_API = 0xAA
_UFFDIO = 0xAA  # ioctl type byte


def _ioc(direction: int, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: dir<<30 | size<<16 | type<<8 | nr
    return (direction << 30) | (size << 16) | (_UFFDIO << 8) | nr


_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


class UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioCopy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class UffdioZeropage(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, 0x3F, ctypes.sizeof(UffdioApi))
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, 0x00, ctypes.sizeof(UffdioRegister))
UFFDIO_UNREGISTER = _ioc(_IOC_READ, 0x01, ctypes.sizeof(UffdioRange))
UFFDIO_WAKE = _ioc(_IOC_READ, 0x02, ctypes.sizeof(UffdioRange))
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, 0x03, ctypes.sizeof(UffdioCopy))
UFFDIO_ZEROPAGE = _ioc(_IOC_READ | _IOC_WRITE, 0x04, ctypes.sizeof(UffdioZeropage))
USERFAULTFD_IOC_NEW = _ioc(_IOC_NONE, 0x00, 0)  # on /dev/userfaultfd

# ioctl bits reported by UFFDIO_REGISTER (bit = ioctl nr)
UFFD_IOCTL_WAKE = 1 << 0x02
UFFD_IOCTL_COPY = 1 << 0x03
UFFD_IOCTL_ZEROPAGE = 1 << 0x04

UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8

UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_COPY_MODE_DONTWAKE = 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1

# struct uffd_msg: event u8 @0, 7 reserved bytes, pagefault.flags u64 @8,
# pagefault.address u64 @16, pagefault.feat.ptid u32 @24, 4 bytes of union tail.
UFFD_MSG = struct.Struct("<B7xQQI4x")
UFFD_MSG_SIZE = UFFD_MSG.size  # 32

SYS_userfaultfd = 323  # x86-64
_O_CLOEXEC = os.O_CLOEXEC
_O_NONBLOCK = os.O_NONBLOCK

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class UffdError(OSError):
    """A userfaultfd call failed; errno and the operation are in the message."""


class FaultMsg(NamedTuple):
    """One page-fault message read from a uffd."""

    address: int
    flags: int  # UFFD_PAGEFAULT_FLAG_*
    ptid: int  # faulting thread id (needs UFFD_FEATURE_THREAD_ID), else 0


def _check(ret: int, what: str) -> None:
    if ret < 0:
        e = ctypes.get_errno()
        raise UffdError(e, f"{what}: {os.strerror(e)}")


def _open_fd(nonblock: bool) -> int:
    """A new uffd, from /dev/userfaultfd when present (works with
    vm.unprivileged_userfaultfd=0 for anyone allowed to open it), else the syscall.
    Never UFFD_USER_MODE_ONLY: KVM faults on guest memory happen in kernel mode."""
    flags = _O_CLOEXEC | (_O_NONBLOCK if nonblock else 0)
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        dev = -1
    if dev >= 0:
        try:
            return fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
        except OSError:
            pass  # fall back to the syscall
        finally:
            os.close(dev)
    fd = _syscall(SYS_userfaultfd, ctypes.c_int(flags))
    _check(fd, "userfaultfd()")
    return int(fd)


class Uffd:
    """One userfaultfd, handshaken. Thread-safe: every call builds its own
    argument struct, and the kernel serialises what needs serialising."""

    def __init__(self, *, sigbus: bool = False, thread_id: bool = True, nonblock: bool = True):
        self.fd = _open_fd(nonblock)
        want = (UFFD_FEATURE_THREAD_ID if thread_id else 0) | (UFFD_FEATURE_SIGBUS if sigbus else 0)
        api = UffdioApi(UFFD_API, want, 0)
        try:
            _check(_ioctl(self.fd, UFFDIO_API, ctypes.byref(api)), f"UFFDIO_API features={want:#x}")
        except BaseException:
            os.close(self.fd)
            raise
        self.features = want  # what this uffd uses (fdinfo shows the same)
        self.kernel_features = int(api.features)  # everything the kernel offers
        self.api_ioctls = int(api.ioctls)
        self._closed = False

    # --- lifecycle ---
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> "Uffd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- ranges ---
    def register(self, start: int, length: int, mode: int = UFFDIO_REGISTER_MODE_MISSING) -> int:
        """Register [start, start+length); returns the ioctl bitmask the range allows."""
        reg = UffdioRegister(UffdioRange(start, length), mode, 0)
        _check(_ioctl(self.fd, UFFDIO_REGISTER, ctypes.byref(reg)),
               f"UFFDIO_REGISTER {start:#x}+{length:#x}")
        if not reg.ioctls & UFFD_IOCTL_COPY:
            raise UffdError(errno.EINVAL, "UFFDIO_REGISTER: range does not allow UFFDIO_COPY")
        return int(reg.ioctls)

    def unregister(self, start: int, length: int) -> None:
        rng = UffdioRange(start, length)
        _check(_ioctl(self.fd, UFFDIO_UNREGISTER, ctypes.byref(rng)),
               f"UFFDIO_UNREGISTER {start:#x}+{length:#x}")

    # --- resolving (hot path: ints, no exceptions) ---
    def copy(self, dst: int, src: int, length: int, dontwake: bool = False) -> int:
        """UFFDIO_COPY; returns bytes copied, or -errno (-EEXIST: a page was
        already present; bytes before it may have been copied, see copy_range)."""
        arg = UffdioCopy(dst, src, length, UFFDIO_COPY_MODE_DONTWAKE if dontwake else 0, 0)
        if _ioctl(self.fd, UFFDIO_COPY, ctypes.byref(arg)) == 0:
            return int(arg.copy)
        err = ctypes.get_errno()
        return -err if arg.copy <= 0 else int(arg.copy)

    def copy_range(self, dst: int, src: int, length: int, page_size: int) -> tuple[int, int]:
        """Copy a multi-page range, skipping pages that are already present.
        Returns (bytes installed, pages skipped because present: EEXIST races)."""
        installed = skipped = 0
        off = 0
        while off < length:
            arg = UffdioCopy(dst + off, src + off, length - off, 0, 0)
            ret = _ioctl(self.fd, UFFDIO_COPY, ctypes.byref(arg))
            done = int(arg.copy) if arg.copy > 0 else 0
            installed += done
            off += done
            if ret == 0:
                break
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                skipped += 1
                off += page_size  # the page at dst+off is present: leave it alone
            elif err == errno.EAGAIN:
                continue  # mm changed under us (the kernel says retry)
            else:
                raise UffdError(err, f"UFFDIO_COPY {dst + off:#x}+{length - off:#x}: {os.strerror(err)}")
        return installed, skipped

    def zeropage(self, start: int, length: int, dontwake: bool = False) -> int:
        """UFFDIO_ZEROPAGE; returns bytes zeroed or -errno."""
        arg = UffdioZeropage(UffdioRange(start, length), UFFDIO_ZEROPAGE_MODE_DONTWAKE if dontwake else 0, 0)
        if _ioctl(self.fd, UFFDIO_ZEROPAGE, ctypes.byref(arg)) == 0:
            return int(arg.zeropage)
        return -ctypes.get_errno()

    def wake(self, start: int, length: int) -> None:
        rng = UffdioRange(start, length)
        _check(_ioctl(self.fd, UFFDIO_WAKE, ctypes.byref(rng)), f"UFFDIO_WAKE {start:#x}+{length:#x}")

    # --- events ---
    def read_raw(self, max_msgs: int = 64) -> bytes:
        """Read up to max_msgs uffd_msg structs in one read(); b'' if none are
        queued (non-blocking fd). Parse with iter_faults() or UFFD_MSG."""
        try:
            return os.read(self.fd, UFFD_MSG_SIZE * max_msgs)
        except BlockingIOError:
            return b""

    def read_faults(self, max_msgs: int = 64) -> list[FaultMsg]:
        return list(iter_faults(self.read_raw(max_msgs)))

    def wait(self, timeout_s: float | None, extra_fd: int | None = None) -> bool:
        """Block until a message is readable (True) or timeout / extra_fd is
        readable (False). extra_fd lets a stop signal (eventfd, pipe) wake readers."""
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        if extra_fd is not None:
            p.register(extra_fd, select.POLLIN)
        ms = None if timeout_s is None else max(0, int(timeout_s * 1000))
        return any(fd == self.fd for fd, _ in p.poll(ms))


def iter_faults(raw: bytes):
    """Page-fault messages in a buffer from read_raw(); other events are skipped."""
    for event, flags, address, ptid in UFFD_MSG.iter_unpack(raw):
        if event == UFFD_EVENT_PAGEFAULT:
            yield FaultMsg(address, flags, ptid)


def proc_path(pid: int | str, *parts: str, proc_root: str = "/proc") -> str:
    return os.path.join(proc_root, str(pid), *parts)


def read_fdinfo(pid: int | str, fd: int, proc_root: str = "/proc") -> UffdFdinfo:
    """Queue depth and features of a uffd from /proc/<pid>/fdinfo/<fd>.
    Raises ValueError if the fd is not a userfaultfd."""
    with open(proc_path(pid, "fdinfo", str(fd), proc_root=proc_root)) as f:
        info = parse_fdinfo(f.read())
    if info is None:
        raise ValueError(f"/proc/{pid}/fdinfo/{fd} is not a userfaultfd")
    return info


# --- anonymous memory by address (guest RAM, source images) -----------------

PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x02, 0x20, 0x4000
MADV_DONTNEED = 4
_mmap = _libc.mmap
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class AnonMemory:
    """Private anonymous memory known by address (no Python buffer exports,
    so it can be unmapped at any time). Pages are missing until touched,
    which is what uffd MISSING mode needs."""

    def __init__(self, size: int):
        addr = _mmap(None, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            e = ctypes.get_errno()
            raise UffdError(e, f"mmap {size} bytes: {os.strerror(e)}")
        self.addr: int = addr
        self.size = size

    def drop(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) missing again (MADV_DONTNEED)."""
        _check(_madvise(self.addr + offset, length, MADV_DONTNEED), "madvise(DONTNEED)")

    def close(self) -> None:
        if self.addr:
            _munmap(self.addr, self.size)
            self.addr = 0

    def __enter__(self) -> "AnonMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
