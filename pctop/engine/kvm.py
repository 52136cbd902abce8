"""A thin /dev/kvm binding: fcntl.ioctl + mmap + ctypes structs, no extra dependencies.

Only what the reference engine needs: one VM, user memory slots, vCPUs with
register set-up, KVM_RUN, and the capability probes pctop reports. Struct
layouts are the x86-64 ABI of <linux/kvm.h>; tests/system/test_kvm.py pins their
sizes and offsets.

Stopping a vCPU from another thread (see `Vcpu.kick`): the vCPU thread keeps
KICK_SIGNAL blocked and hands KVM, through KVM_SET_SIGNAL_MASK, a run mask in
which it is unblocked. A tgkill() of that signal then makes KVM_RUN return
EINTR (also out of a userfaultfd wait, which sleeps interruptibly), and the
signal stays pending-but-blocked afterwards, so no handler ever runs and no
Python signal machinery is involved (Python handlers exist only on the main
thread, and SIG_IGN would discard the signal without interrupting KVM_RUN).
`kvm_run.immediate_exit` closes the race where the kick lands just before
the thread enters KVM_RUN. This is the scheme QEMU uses for its SIG_IPI.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import signal
import struct
import threading
import time
from typing import NamedTuple

# ioctl numbers (x86-64, _IO/_IOR/_IOW/_IOWR on KVMIO = 0xAE).
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_TSS_ADDR = 0xAE47
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_GET_MSRS = 0xC008AE88
KVM_SET_MSRS = 0x4008AE89
KVM_SET_SIGNAL_MASK = 0x4004AE8B
KVM_SET_CPUID2 = 0x4008AE90
KVM_GET_STATS_FD = 0xAECE

# Capabilities.
KVM_CAP_USER_MEMORY = 3
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_MEMORY_FAULT_INFO = 232

# Exit reasons.
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_MEMORY_FAULT = 39
EXIT_NAMES = {0: "unknown", 2: "io", 5: "hlt", 6: "mmio", 8: "shutdown", 9: "fail_entry",
              17: "internal_error", 39: "memory_fault"}

KVM_EXIT_IO_OUT = 1

# A real-time signal nobody else in pctop uses; it is only ever pending, never delivered.
KICK_SIGNAL = signal.SIGRTMIN + 5

DEV_KVM = "/dev/kvm"


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class KvmRegs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16), ("type", ctypes.c_uint8),
                ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8), ("db", ctypes.c_uint8),
                ("s", ctypes.c_uint8), ("l", ctypes.c_uint8), ("g", ctypes.c_uint8),
                ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
                ("padding", ctypes.c_uint8)]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = ([(name, KvmSegment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
                + [("gdt", KvmDtable), ("idt", KvmDtable)]
                + [(name, ctypes.c_uint64) for name in
                   ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
                + [("interrupt_bitmap", ctypes.c_uint64 * 4)])


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32),
                ("data", ctypes.c_uint64)]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [("function", ctypes.c_uint32), ("index", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("eax", ctypes.c_uint32), ("ebx", ctypes.c_uint32),
                ("ecx", ctypes.c_uint32), ("edx", ctypes.c_uint32),
                ("padding", ctypes.c_uint32 * 3)]


def _header_and_array(entry_type: type, count: int, count_field: str) -> ctypes.Structure:
    """A `{u32 count; u32 pad; entry[count]}` struct (kvm_msrs, kvm_cpuid2)."""
    cls = type(f"Kvm{entry_type.__name__}Array{count}", (ctypes.Structure,), {
        "_fields_": [(count_field, ctypes.c_uint32), ("padding", ctypes.c_uint32),
                     ("entries", entry_type * count)]})
    obj = cls()
    setattr(obj, count_field, count)
    return obj


class KvmRunIo(ctypes.Structure):
    _fields_ = [("direction", ctypes.c_uint8), ("size", ctypes.c_uint8),
                ("port", ctypes.c_uint16), ("count", ctypes.c_uint32),
                ("data_offset", ctypes.c_uint64)]


class KvmRunMemoryFault(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("gpa", ctypes.c_uint64), ("size", ctypes.c_uint64)]


class KvmRunExit(ctypes.Union):
    _fields_ = [("io", KvmRunIo), ("memory_fault", KvmRunMemoryFault),
                ("hardware_entry_failure_reason", ctypes.c_uint64),
                ("internal_suberror", ctypes.c_uint32),
                ("padding", ctypes.c_char * 256)]


class KvmRun(ctypes.Structure):
    """The head of the vCPU's shared `struct kvm_run` page (what we read or write)."""
    _fields_ = [("request_interrupt_window", ctypes.c_uint8),
                ("immediate_exit", ctypes.c_uint8), ("padding1", ctypes.c_uint8 * 6),
                ("exit_reason", ctypes.c_uint32),
                ("ready_for_interrupt_injection", ctypes.c_uint8),
                ("if_flag", ctypes.c_uint8), ("flags", ctypes.c_uint16),
                ("cr8", ctypes.c_uint64), ("apic_base", ctypes.c_uint64),
                ("exit", KvmRunExit)]


# KVM_RUN goes through libc directly: on the vCPU-exit path it fails with EFAULT once
# per fault, and a failing fcntl.ioctl costs ~2.6 us (building an OSError) against
# ~0.7 us for a ctypes call returning -1 (measured here). Both release the GIL.
_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc_ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg) -> int:
    """fcntl.ioctl that mutates ctypes/bytearray args in place (the GIL is released)."""
    if isinstance(arg, int):   # fcntl.ioctl takes only a C int here; KVM wants an unsigned long
        ret = _libc_ioctl(fd, request, arg)
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return ret
    return fcntl.ioctl(fd, request, arg, True)


# ---- KVM_RUN timed in native code (native/kvm_run.c), built with the system's C compiler
NATIVE_SOURCE = os.path.join(os.path.dirname(__file__), "native", "kvm_run.c")


class NativeRun(NamedTuple):
    """The compiled helpers (see native/kvm_run.c); None from native_run() where none."""
    kvm_run: object    # (fd, byref(int64 t_enter), byref(int64 t_exit)) -> errno or 0, GIL released
    tsc_pair: object   # (byref(int64 ns), byref(uint64 tsc)) -> width of the clock pair (ns)
    path: str


def native_cache_dir() -> str:
    """Where the compiled helper is kept: $XDG_CACHE_HOME/pctop, else ~/.cache/pctop."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pctop")


_native: list = []   # [NativeRun | None] once tried: one build per process
_native_lock = threading.Lock()
native_error = ""    # why native_run() is None (for logs and tests)


def native_run() -> NativeRun | None:
    """The native KVM_RUN helper, compiled on first use into native_cache_dir() (keyed by
    a hash of its source), or None when it cannot be (no compiler, PCTOP_NATIVE=0): the
    engine then times KVM_RUN in Python and says so ("stall_clock": "python")."""
    with _native_lock:
        if not _native:
            _native.append(_load_native())
        return _native[0]


def _load_native() -> NativeRun | None:
    global native_error
    if os.environ.get("PCTOP_NATIVE", "1") == "0":
        native_error = "disabled by PCTOP_NATIVE=0"
        return None
    import hashlib
    import shutil
    import subprocess
    import tempfile

    try:
        with open(NATIVE_SOURCE, "rb") as f:
            src = f.read()
        key = hashlib.sha256(src + os.uname().machine.encode()).hexdigest()[:16]
        out_dir = native_cache_dir()
        lib = os.path.join(out_dir, f"kvm_run-{key}.so")
        if not os.path.exists(lib):
            cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            if not cc:
                native_error = "no C compiler (cc/gcc) on PATH"
                return None
            os.makedirs(out_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
            os.close(fd)
            try:
                r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, NATIVE_SOURCE],
                                   capture_output=True, text=True, timeout=60)
                if r.returncode != 0:
                    native_error = f"{cc} failed: {r.stderr.strip().splitlines()[-1:]}"
                    return None
                os.replace(tmp, lib)   # atomic: engines starting together share one build
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        dll = ctypes.CDLL(lib)         # CDLL: every call releases the GIL
    except (OSError, subprocess.SubprocessError) as e:
        native_error = f"native KVM_RUN helper: {e}"
        return None
    run = dll.pctop_kvm_run
    run.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    run.restype = ctypes.c_int
    pair = dll.pctop_tsc_pair
    pair.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    pair.restype = ctypes.c_int64
    return NativeRun(run, pair, lib)


_STATS_HEADER = struct.Struct("<IIIIII")   # flags, name_size, num_desc, id/desc/data offsets
_STATS_DESC = struct.Struct("<IhHII")      # flags, exponent, size, offset, bucket_size


def read_binary_stats(stats_fd: int) -> dict[str, int]:
    """Scalar counters from a KVM_GET_STATS_FD fd (Documentation/virt/kvm/api.rst 4.133).

    The same numbers debugfs shows, but readable where debugfs is not (it refuses
    reads on some hosts, this one included). Histogram stats keep only bucket 0.
    """
    head = os.pread(stats_fd, _STATS_HEADER.size, 0)
    _, name_size, count, _, desc_offset, data_offset = _STATS_HEADER.unpack(head)
    desc_size = _STATS_DESC.size + name_size
    descs = os.pread(stats_fd, desc_size * count, desc_offset)
    stats, data_len = {}, 0
    layout = []
    for i in range(count):
        _, _, size, offset, _ = _STATS_DESC.unpack_from(descs, i * desc_size)
        raw = descs[i * desc_size + _STATS_DESC.size:(i + 1) * desc_size]
        layout.append((raw.split(b"\0", 1)[0].decode(), offset))
        data_len = max(data_len, offset + 8 * size)
    data = os.pread(stats_fd, data_len, data_offset)
    for name, offset in layout:
        stats[name] = struct.unpack_from("<Q", data, offset)[0]
    return stats


class Capabilities(NamedTuple):
    vendor: str             # "vmx", "svm", "pvm" or "none"
    api_version: int
    memory_fault_info: bool  # KVM_CAP_MEMORY_FAULT_INFO; see platform notes: may be 1 yet unfilled
    immediate_exit: bool


def kvm_vendor(sys_module: str = "/sys/module") -> str:
    """Which KVM flavour is loaded: "vmx", "svm", "pvm", or "none" when /dev/kvm is absent."""
    if not os.path.exists(DEV_KVM):
        return "none"
    for module, name in (("kvm_intel", "vmx"), ("kvm_amd", "svm"), ("kvm_pvm", "pvm")):
        if os.path.isdir(os.path.join(sys_module, module)):
            return name
    return "none"


def kvm_unavailable_reason(path: str = DEV_KVM) -> str | None:
    """None if a VM can be created here, else a one-line reason (for "falling back to threads")."""
    if not os.path.exists(path):
        return f"{path} does not exist (no KVM module loaded, or not exposed to this machine)"
    try:
        kvm = Kvm(path)
    except OSError as e:
        return f"cannot use {path}: {e.strerror or e}"
    try:
        os.close(_ioctl(kvm.fd, KVM_CREATE_VM, 0))
    except OSError as e:
        return f"KVM_CREATE_VM failed: {e.strerror or e}"
    finally:
        kvm.close()
    return None


class Kvm:
    """The /dev/kvm system fd."""

    def __init__(self, path: str = DEV_KVM):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.api_version = _ioctl(self.fd, KVM_GET_API_VERSION, 0)
        if self.api_version != 12:
            os.close(self.fd)
            raise OSError(f"unexpected KVM API version {self.api_version} (want 12)")
        self.vcpu_mmap_size = _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE, 0)

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def capabilities(self) -> Capabilities:
        return Capabilities(kvm_vendor(), self.api_version,
                            self.check_extension(KVM_CAP_MEMORY_FAULT_INFO) > 0,
                            self.check_extension(KVM_CAP_IMMEDIATE_EXIT) > 0)

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID as a kvm_cpuid2 struct ready for KVM_SET_CPUID2."""
        count = 64
        while True:
            cpuid = _header_and_array(KvmCpuidEntry2, count, "nent")
            try:
                _ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, cpuid)
                return cpuid
            except OSError as e:
                if e.errno != errno.E2BIG or count >= 4096:
                    raise
                count *= 2

    def create_vm(self) -> "Vm":
        return Vm(self, _ioctl(self.fd, KVM_CREATE_VM, 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[Vcpu] = []

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int,
                               flags: int = 0) -> None:
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION,
               KvmUserspaceMemoryRegion(slot, flags, gpa, size, host_addr))

    def set_tss_addr(self, gpa: int) -> None:
        """Needed by VMX without unrestricted guest; refused or unneeded elsewhere."""
        try:
            _ioctl(self.fd, KVM_SET_TSS_ADDR, gpa)
        except OSError:
            pass

    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        vcpu = Vcpu(self, vcpu_id, _ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id))
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    def __init__(self, vm: Vm, vcpu_id: int, fd: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self._run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = KvmRun.from_buffer(self._run_map)
        self.thread_ident: int | None = None   # pthread id of the thread that runs it
        # pthread_kill on a thread that has ended is undefined (it crashed the engine in
        # glibc): the running thread gives up its id under this lock before it ends.
        self._kick_lock = threading.Lock()
        self._stats_fd = -1

    # --- state -------------------------------------------------------------
    def get_regs(self) -> KvmRegs:
        regs = KvmRegs()
        _ioctl(self.fd, KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        _ioctl(self.fd, KVM_SET_REGS, regs)

    def get_sregs(self) -> KvmSregs:
        sregs = KvmSregs()
        _ioctl(self.fd, KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        _ioctl(self.fd, KVM_SET_SREGS, sregs)

    def set_msrs(self, msrs: dict[int, int]) -> int:
        arr = _header_and_array(KvmMsrEntry, len(msrs), "nmsrs")
        for entry, (index, value) in zip(arr.entries, msrs.items()):
            entry.index, entry.data = index, value
        return _ioctl(self.fd, KVM_SET_MSRS, arr)   # returns how many were set

    def get_msr(self, index: int) -> int:
        arr = _header_and_array(KvmMsrEntry, 1, "nmsrs")
        arr.entries[0].index = index
        if _ioctl(self.fd, KVM_GET_MSRS, arr) != 1:
            raise OSError(errno.EINVAL, f"KVM_GET_MSRS refused MSR {index:#x}")
        return arr.entries[0].data

    def set_cpuid(self, cpuid) -> None:
        _ioctl(self.fd, KVM_SET_CPUID2, cpuid)

    def open_stats(self) -> None:
        """Open the stats fd now: every vCPU ioctl waits for the vCPU mutex, which
        KVM_RUN holds, so it cannot be opened from another thread while the guest runs."""
        if self._stats_fd < 0 and self.vm.kvm.check_extension(KVM_CAP_BINARY_STATS_FD):
            self._stats_fd = _ioctl(self.fd, KVM_GET_STATS_FD, 0)

    def stats(self) -> dict[str, int]:
        """This vCPU's KVM counters (exits, insn_emulation, pf_taken, ...); any thread
        may call it once open_stats() was called. {} where KVM has no binary stats."""
        return read_binary_stats(self._stats_fd) if self._stats_fd >= 0 else {}

    # --- running -------------------------------------------------------------
    def prepare_kick(self) -> None:
        """Call on the thread that will run this vCPU, before the first run()."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
        # KVM's run mask = this thread's mask without KICK_SIGNAL.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set()) - {KICK_SIGNAL}
        bits = 0
        for sig in blocked:
            bits |= 1 << (int(sig) - 1)
        _ioctl(self.fd, KVM_SET_SIGNAL_MASK, bytearray(struct.pack("<IQ", 8, bits)))
        self.thread_ident = threading.get_ident()

    def run(self) -> int:
        """One KVM_RUN. Returns the exit reason; raises OSError (EINTR, EFAULT, ...)."""
        err = self.run_errno()
        if err:
            raise OSError(err, os.strerror(err))
        return self.run_struct.exit_reason

    def run_errno(self) -> int:
        """One KVM_RUN without exceptions: 0 (see run_struct.exit_reason) or the errno."""
        if _libc_ioctl(self.fd, KVM_RUN, 0) < 0:
            return ctypes.get_errno()
        return 0

    def timed_runner(self):
        """(run, t_enter, t_exit, clock): run() does one KVM_RUN and returns 0 or the errno,
        leaving in t_enter.value / t_exit.value the CLOCK_MONOTONIC ns just before and just
        after the ioctl. clock "native": read in C around the ioctl (native/kvm_run.c);
        "python": read in Python around the ctypes call (the GIL and the interpreter add
        microseconds on both sides), where the helper cannot be built."""
        t_enter, t_exit = ctypes.c_int64(), ctypes.c_int64()
        nat = native_run()
        fd = self.fd
        if nat is not None:
            native, p_enter, p_exit = nat.kvm_run, ctypes.byref(t_enter), ctypes.byref(t_exit)

            def run() -> int:
                return native(fd, p_enter, p_exit)
            return run, t_enter, t_exit, "native"
        clock, run_errno = time.monotonic_ns, self.run_errno

        def run_py() -> int:
            t_enter.value = clock()
            err = run_errno()
            t_exit.value = clock()
            return err
        return run_py, t_enter, t_exit, "python"

    def kick(self) -> None:
        """Make the running (or next) KVM_RUN of this vCPU return EINTR promptly."""
        if self.fd < 0:
            return   # already closed by its thread: nothing left to stop
        self.run_struct.immediate_exit = 1
        with self._kick_lock:
            if self.thread_ident is not None:
                signal.pthread_kill(self.thread_ident, KICK_SIGNAL)

    def release_thread(self) -> None:
        """Called by the vCPU's own thread as it stops running it: no more kick signals."""
        with self._kick_lock:
            self.thread_ident = None

    @staticmethod
    def consume_kick() -> None:
        """Drop a kick left pending on the calling thread (so the next KVM_RUN is not cut short)."""
        signal.sigtimedwait({KICK_SIGNAL}, 0)

    def close(self) -> None:
        if self.fd >= 0:
            del self.run_struct
            try:
                self._run_map.close()
            except BufferError:
                pass   # a ctypes view (e.g. in a stored traceback) still uses it: GC unmaps it
            if self._stats_fd >= 0:
                os.close(self._stats_fd)
                self._stats_fd = -1
            os.close(self.fd)
            self.fd = -1
