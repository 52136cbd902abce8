"""Guest workloads for the reference engine: a real KVM guest, or threads where /dev/kvm is missing.

Both take the migrated RAM as a host address + size that the caller mmapped (and
usually registered with userfaultfd); neither touches it from the host except
through the guest's (or worker threads') accesses. Both follow the same access
model (pctop.engine.guest): for a seed they access the same pages in the same
order and write the same pages.

vCPU exits on missing pages (the "vcpu-exit" strategy, uffd with UFFD_FEATURE_SIGBUS):
  * KvmWorkload: KVM_RUN fails with EFAULT. If the kernel filled kvm_run.memory_fault
    (exit 39) its gpa is used ("memory_fault"); otherwise the page the guest published
    in its mailbox just before the access ("guest-assisted"; the only source under PVM).
  * ThreadWorkload: a SIGBUS cannot be handled in Python, so before each access the
    worker asks mincore() whether the page is present and, if not, calls
    on_memory_fault with the address it is about to touch ("guest-assisted": the
    workload itself names the page). Pages never go away again in post-copy, so
    present-then-access cannot race into a SIGBUS.
on_memory_fault(vcpu, host_addr, address_source) runs on the vCPU thread, must make
the page present (UFFDIO_COPY, EEXIST is fine) and return; the access is then retried.

The GIL: a vCPU thread needs it for a few microseconds per exit (KVM_RUN itself and
the fault wait run without it). Another Python thread that stays busy keeps it for a
whole switch interval (5 ms by default): measured here, vCPU-exit faults fell from
25k/s to 1.1k/s next to one busy thread (8.2k/s with sys.setswitchinterval(0.0002)).
Keep the engine's other threads blocking, or lower the switch interval.

Thread names: KVM vCPU threads are "CPU N/KVM" (QEMU's naming), worker threads "vcpu N";
each vCPU is created (KVM_CREATE_VCPU) on the thread that then runs it, as QEMU does.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import struct
import threading
import time
from typing import Callable, NamedTuple

from pctop.engine import guest as g
from pctop.engine import kvm as k
from pctop.hist import bucket_index
from pctop.model import HIST_BUCKETS

PATTERNS = ("seq", "random", "hotset")
LAYOUTS = ("sharded", "shared")
PR_SET_NAME = 15

MemoryFaultHandler = Callable[[int, int, str], None]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


class VcpuProgress(NamedTuple):
    touched: int    # pages accessed so far
    passes: int     # completed passes (a pass = as many accesses as the region has pages)
    target: int     # host address of the page being (or last) accessed, 0 before the first
    done: bool      # finished its passes


class StallClocks(NamedTuple):
    """One vCPU's stalls timed by the engine without pctop's probes (KvmWorkload only).

    guest_*: the guest's own clock (rdtsc before and after each access, guest.py): the
      accesses slower than SLOW_ACCESS_NS and their summed duration, converted to ns with
      the TSC frequency (None without the native helper). Every fault the vCPU waits for
      is one, whatever resolves it (uffd read, the stream, a KVM_RUN exit).
    exit_*: vcpu-exit strategy, KVM_RUN returned EFAULT -> the next KVM_RUN entry on that
      thread, read around the ioctl (the workload's stall_clock: "native" or "python").
    *_hist: the same stalls one by one, in pctop's log2 us buckets (pctop.hist), so a
      test can compare them stall for stall with pctop's histogram, not only as sums;
      guest_hist is None when the guest's log overflowed or without the native helper."""
    guest_stalls: int
    guest_stall_ns: int | None
    exit_stalls: int
    exit_stall_ns: int
    guest_hist: list[int] | None
    exit_hist: list[int]


# A guest access slower than this is a stall. A fault waited for takes >= 20 us here (a
# cross-CPU wake-up on the project's test VMs); an access that only maps a present page takes a few us.
SLOW_ACCESS_NS = 10_000
DEFAULT_TSC_HZ = 3e9   # only for the threshold, where the frequency cannot be measured


def _tsc_pair() -> tuple[int, int]:
    """(CLOCK_MONOTONIC ns, TSC) read together; the narrowest of a few tries."""
    nat = k.native_run()
    ns, tsc = ctypes.c_int64(), ctypes.c_uint64()
    best = None
    for _ in range(5):
        width = nat.tsc_pair(ctypes.byref(ns), ctypes.byref(tsc))
        if best is None or width < best[0]:
            best = (width, ns.value, tsc.value)
    return best[1], best[2]


class WorkloadError(RuntimeError):
    """A vCPU thread failed (guest crash, unexpected exit, handler exception)."""


def set_thread_name(name: str) -> None:
    """prctl(PR_SET_NAME): the name /proc/<pid>/task/<tid>/comm shows (15 bytes max)."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & g.MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & g.MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & g.MASK64
    return x ^ (x >> 31)


def plan_vcpus(data_pages: int, vcpus: int, layout: str, seed: int) -> list[g.VcpuPlan]:
    """sharded: vCPU i owns pages [data_pages*i//vcpus, data_pages*(i+1)//vcpus) (the
    engine's per-shard uffds split the same way); shared: every vCPU roams the whole
    region, seq cursors start spread out."""
    plans = []
    for i in range(vcpus):
        state = _splitmix64(seed * 0x100000001B3 + i) or 1     # xorshift64 needs != 0
        lo, hi = data_pages * i // vcpus, data_pages * (i + 1) // vcpus
        if layout == "sharded":
            plans.append(g.VcpuPlan(lo, hi - lo, 0, state))
        else:
            plans.append(g.VcpuPlan(0, data_pages, lo, state))
    return plans


class _WorkloadBase:
    kind = ""

    def __init__(self, data_addr: int, data_size: int, vcpus: int, pattern: str = "random",
                 write_ratio: float = 0.0, seed: int = 1, layout: str = "sharded",
                 hot_fraction: float = 0.1, passes: int | None = None, page_size: int = 4096,
                 hot_access: float = 0.9):
        """hot_fraction: share of each region's pages (its first pages, rounded, >= 1) that is hot;
        hot_access: probability that an access of the `hotset` pattern goes to the hot set."""
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, not {pattern!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
        if page_size < 4096 or page_size & (page_size - 1):
            raise ValueError(f"page size must be a power of two >= 4096, not {page_size}")
        if data_addr % page_size or data_size % page_size or data_size <= 0:
            raise ValueError("data address and size must be positive multiples of the page size")
        if not 0.0 <= write_ratio <= 1.0 or not 0.0 <= hot_access <= 1.0:
            raise ValueError("write_ratio and hot_access must be within 0..1")
        if not 0.0 < hot_fraction <= 1.0:
            raise ValueError("hot_fraction must be within (0, 1]")
        if passes is not None and passes < 1:
            raise ValueError("passes must be at least 1 (or None to run until stopped)")
        if vcpus < 1 or vcpus > data_size // page_size:
            raise ValueError("need at least 1 vCPU and no more vCPUs than data pages")
        self.data_addr, self.data_size, self.vcpus = data_addr, data_size, vcpus
        self.page_size, self.pattern, self.layout = page_size, pattern, layout
        self.params = g.GuestParams(pattern, page_size.bit_length() - 1, write_ratio, passes or 0)
        self.plans = plan_vcpus(data_size // page_size, vcpus, layout, seed)
        self.hot_access = hot_access
        self.hot_npages = [max(1, round(p.npages * hot_fraction)) for p in self.plans]
        self.errors: list[BaseException] = []
        self._setup_errors: list[BaseException] = []  # the subset raised before a vCPU was ready
        self._threads: list[threading.Thread] = []
        self._tids = [0] * vcpus
        self._stopping = False
        self._on_memory_fault: MemoryFaultHandler | None = None

    def model(self, vcpu: int) -> g.AccessModel:
        """A fresh Python model of vCPU `vcpu`'s accesses."""
        return g.AccessModel(self.plans[vcpu], self.params, self.hot_npages[vcpu], self.hot_access)

    def _spawn(self, name: str, on_memory_fault: MemoryFaultHandler | None) -> None:
        if self._threads:
            raise RuntimeError("workload already started")
        self._on_memory_fault = on_memory_fault
        ready = [threading.Event() for _ in range(self.vcpus)]
        for i in range(self.vcpus):
            t = threading.Thread(target=self._thread_main, args=(i, ready[i]),
                                 name=name.format(i), daemon=True)
            self._threads.append(t)
            t.start()
        for event in ready:
            event.wait()
        # Only set-up failures belong here: a vCPU that is ready may already have
        # run and failed (e.g. EFAULT), which wait() reports.
        if self._setup_errors:
            self.stop()
            raise WorkloadError(f"vCPU set-up failed: {self._setup_errors[0]}")

    def _thread_main(self, i: int, ready: threading.Event) -> None:
        set_thread_name(threading.current_thread().name)
        self._tids[i] = threading.get_native_id()
        try:
            self._run_vcpu(i, ready)
        except BaseException as e:   # reported through wait()/errors, never lost
            if not ready.is_set():
                self._setup_errors.append(e)
            self.errors.append(e)
        finally:
            ready.set()

    def vcpu_tids(self) -> list[int]:
        """OS thread id of each vCPU's thread (index = vCPU), known once start() returned."""
        return list(self._tids)

    def wait(self, timeout: float) -> bool:
        """True once every vCPU finished its passes; raises WorkloadError if one failed."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self.errors:
            raise WorkloadError(str(self.errors[0])) from self.errors[0]
        return bool(self._threads) and all(p.done for p in self.progress())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class KvmWorkload(_WorkloadBase):
    """The guest of pctop.engine.guest in a real KVM VM, one Python thread per vCPU."""
    kind = "kvm"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layout_info = g.plan_layout(self.data_size, self.page_size, self.vcpus)
        self.code = g.build_code(self.params)
        self._system = mmap.mmap(-1, self.layout_info.system_size)
        g.fill_system(self._system, self.layout_info, self.data_size, self.code.assemble())
        self._kvm = k.Kvm()
        self.capabilities = self._kvm.capabilities()
        self._cpuid = self._kvm.supported_cpuid()
        self._has_fsgsbase = any(e.function == 7 and e.index == 0 and e.ebx & 1
                                 for e in self._cpuid.entries[:self._cpuid.nent])
        self._vm = self._kvm.create_vm()
        self._vm.set_tss_addr(0xFFFBD000)
        system_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._system))
        self._vm.set_user_memory_region(0, 0, self.layout_info.system_size, system_addr)
        self._vm.set_user_memory_region(1, g.DATA_GPA, self.data_size, self.data_addr)
        self._vcpus: list[k.Vcpu | None] = [None] * self.vcpus
        self._mailboxes = [(ctypes.c_uint64 * (g.MAILBOX_SIZE // 8)).from_buffer(self._system, g.mailbox_gpa(i))
                           for i in range(self.vcpus)]
        lay = self.layout_info
        for i, mailbox in enumerate(self._mailboxes):
            seen = lay.seen_gpa + i * lay.bitmap_size
            mailbox[g.MB_SEEN // 8] = (seen - g.mailbox_gpa(i)) * 8   # bts [r15], bit offset
            mailbox[g.MB_LOG // 8] = lay.log_gpa + i * lay.log_slots * 8
            mailbox[g.MB_LOG_END // 8] = lay.log_gpa + (i + 1) * lay.log_slots * 8
        self._exit_stalls = [[0, 0] for _ in range(self.vcpus)]   # [count, ns] per vCPU
        self._exit_hists = [[0] * HIST_BUCKETS for _ in range(self.vcpus)]
        self.stall_clock = "native" if k.native_run() is not None else "python"
        self._tsc_start = _tsc_pair() if k.native_run() is not None else None
        # The guest sums accesses slower than SLOW_ACCESS_NS: the threshold in TSC cycles
        # needs the TSC rate, roughly (+-2 %): measured over a short wait, before the run.
        hz = None
        if self._tsc_start is not None:
            time.sleep(0.002)
            hz = self._tsc_hz(min_ns=1_000_000)
        for mailbox in self._mailboxes:
            mailbox[g.MB_SLOW_MIN // 8] = round(SLOW_ACCESS_NS * (hz or DEFAULT_TSC_HZ) / 1e9)

    def start(self, on_memory_fault: MemoryFaultHandler | None = None) -> None:
        self._spawn("CPU {}/KVM", on_memory_fault)

    def _setup_vcpu(self, i: int) -> k.Vcpu:
        vcpu = self._vm.create_vcpu(i)
        self._vcpus[i] = vcpu
        vcpu.set_cpuid(self._cpuid)            # before sregs: long mode needs CPUID.LM
        sregs = vcpu.get_sregs()
        g.set_long_mode_sregs(sregs, fsgsbase=self._has_fsgsbase)
        vcpu.set_sregs(sregs)
        regs = k.KvmRegs()
        entry = g.entry_registers(self.plans[i], i, self.params, self.hot_npages[i],
                                  self.hot_access, self.layout_info.bitmap_gpa)
        for name, value in entry.items():
            setattr(regs, name, value)
        regs.rip, regs.rflags = g.CODE_GPA, g.RFLAGS
        vcpu.set_regs(regs)
        vcpu.open_stats()
        vcpu.prepare_kick()
        return vcpu

    def _run_vcpu(self, i: int, ready: threading.Event) -> None:
        vcpu = self._setup_vcpu(i)
        try:
            self._run_loop(i, vcpu, ready)
        finally:
            vcpu.release_thread()   # this thread is about to end: stop() must not signal it

    def _run_loop(self, i: int, vcpu: k.Vcpu, ready: threading.Event) -> None:
        ready.set()
        on_fault = self._on_memory_fault
        run, t_enter, t_exit, _ = vcpu.timed_runner()  # its clock is self.stall_clock
        run_struct = vcpu.run_struct
        memory_fault = run_struct.exit.memory_fault
        mailbox = self._mailboxes[i]
        data_addr, data_size, page_mask = self.data_addr, self.data_size, ~(self.page_size - 1)
        exit_stall, exit_hist = self._exit_stalls[i], self._exit_hists[i]
        efault_at = 0   # when KVM_RUN returned EFAULT; its stall ends at the next entry
        while not self._stopping:
            err = run()
            if efault_at:
                ns = t_enter.value - efault_at
                exit_stall[1] += ns
                exit_stall[0] += 1
                exit_hist[bucket_index(ns / 1000)] += 1
                efault_at = 0
            if err == 0:
                reason = run_struct.exit_reason
                if reason == k.KVM_EXIT_SHUTDOWN and mailbox[3]:
                    return                                    # the guest's deliberate finish
                raise WorkloadError(f"vCPU {i}: unexpected exit {k.EXIT_NAMES.get(reason, reason)} "
                                    f"(mailbox target {mailbox[2]:#x}, done {mailbox[3]})")
            if err == errno.EFAULT and on_fault is not None:
                efault_at = t_exit.value
                if run_struct.exit_reason == k.KVM_EXIT_MEMORY_FAULT:
                    gpa, source = memory_fault.gpa, "memory_fault"
                    run_struct.exit_reason = 0                # never reuse a stale one
                else:
                    gpa, source = mailbox[2], "guest-assisted"
                offset = gpa - g.DATA_GPA
                if not 0 <= offset < data_size:
                    raise WorkloadError(f"vCPU {i}: EFAULT at GPA {gpa:#x}, outside the data slot")
                on_fault(i, data_addr + (offset & page_mask), source)
            elif err == errno.EINTR:
                vcpu.consume_kick()
                run_struct.immediate_exit = 0
            else:
                raise OSError(err, f"KVM_RUN on vCPU {i}: {errno.errorcode.get(err, err)}")

    def stall_clocks(self) -> list[StallClocks]:
        """Each vCPU's stalls on the clocks the engine does not share with pctop's probes
        (see StallClocks); callable from any thread while the guest runs."""
        hz = self._tsc_hz()
        out = []
        for i, (mailbox, (exits, exit_ns)) in enumerate(zip(self._mailboxes, self._exit_stalls)):
            slow, cycles = mailbox[g.MB_SLOW // 8], mailbox[g.MB_SLOW_CYCLES // 8]
            out.append(StallClocks(slow, round(cycles * 1e9 / hz) if hz else None, exits, exit_ns,
                                   self._guest_hist(i, slow, hz), list(self._exit_hists[i])))
        return out

    def _guest_hist(self, i: int, slow: int, hz: float | None) -> list[int] | None:
        """vCPU i's logged slow first touches, binned; None if its log overflowed."""
        lay = self.layout_info
        if hz is None or slow > lay.log_slots:
            return None
        start = lay.log_gpa + i * lay.log_slots * 8
        hist = [0] * HIST_BUCKETS
        for (cycles,) in struct.iter_unpack("<Q", self._system[start:start + slow * 8]):
            hist[bucket_index(cycles * 1e6 / hz)] += 1
        return hist

    def _tsc_hz(self, min_ns: int = 10_000_000) -> float | None:
        """The TSC frequency, from (TSC, CLOCK_MONOTONIC) pairs read now and at set-up
        (the guest reads the host's TSC: rdtsc at CPL3 runs natively under PVM and VMX/SVM
        without TSC scaling). None without the native helper or before min_ns passed."""
        if self._tsc_start is None:
            return None
        ns, tsc = _tsc_pair()
        if ns - self._tsc_start[0] < min_ns:
            return None
        return (tsc - self._tsc_start[1]) * 1e9 / (ns - self._tsc_start[0])

    def progress(self) -> list[VcpuProgress]:
        out = []
        for mailbox in self._mailboxes:
            touched, passes, target, done = mailbox[:4]
            host = self.data_addr + target - g.DATA_GPA if target else 0
            out.append(VcpuProgress(touched, passes, host, bool(done)))
        return out

    def vcpu_fds(self) -> list[int]:
        """The KVM_CREATE_VCPU fd of each vCPU (index = vCPU id), -1 once stopped."""
        return [vcpu.fd if vcpu is not None else -1 for vcpu in self._vcpus]

    def kvm_stats(self) -> list[dict[str, int]]:
        """Per-vCPU KVM counters (KVM_GET_STATS_FD): exits, insn_emulation, pf_taken, ..."""
        return [vcpu.stats() if vcpu is not None else {} for vcpu in self._vcpus]

    def dirty_pages(self) -> set[int]:
        """Indices (from the start of the data region) of the pages the guest wrote."""
        start = self.layout_info.bitmap_gpa
        pages = set()
        for byte_index, byte in enumerate(self._system[start:start + self.layout_info.bitmap_size]):
            if byte:
                pages.update(byte_index * 8 + bit for bit in range(8) if byte >> bit & 1)
        return pages

    def kick(self, vcpu: int) -> None:
        """Interrupt vCPU `vcpu`'s KVM_RUN once, as QEMU's SIG_IPI does (also out of a
        userfaultfd wait): its loop enters KVM_RUN again, and a fault it was in repeats."""
        v = self._vcpus[vcpu]
        if v is not None:
            v.kick()

    def stop(self) -> None:
        """Stop every vCPU (immediate_exit + kick signal), join the threads, close KVM."""
        self._stopping = True
        for vcpu in self._vcpus:
            if vcpu is not None:
                vcpu.kick()
        for t in self._threads:
            t.join()
        if self._vm is not None:
            self._vm.close()
            self._kvm.close()
            self._vm = None


class ThreadWorkload(_WorkloadBase):
    """The same access model run by plain threads on the data region (no KVM).

    Accesses go through ctypes.memmove (a foreign call: the GIL is released while a
    thread sleeps in a userfaultfd fault). Dirty pages are tracked in the host.
    """
    kind = "threads"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._progress = [[0, 0, 0, False] for _ in range(self.vcpus)]
        self._dirty = bytearray(self.data_size // self.page_size)

    def start(self, on_memory_fault: MemoryFaultHandler | None = None) -> None:
        self._spawn("vcpu {}", on_memory_fault)

    def _run_vcpu(self, i: int, ready: threading.Event) -> None:
        ready.set()
        model, progress, dirty = self.model(i), self._progress[i], self._dirty
        on_fault, page_size = self._on_memory_fault, self.page_size
        region = self.data_addr + (self.plans[i].first_page * page_size)
        first_page, npages = self.plans[i].first_page, self.plans[i].npages
        max_passes = self.params.max_passes
        scratch = ctypes.c_uint64()
        scratch_addr = ctypes.addressof(scratch)
        present = (ctypes.c_ubyte * (page_size // 4096))()   # mincore: a byte per 4 KiB
        memmove, mincore = ctypes.memmove, _libc.mincore
        while not self._stopping:
            index, write_offset = model.next()
            page = region + index * page_size
            progress[2] = page                                # published before the access
            if on_fault is not None:
                if mincore(page, page_size, present) != 0:
                    raise OSError(ctypes.get_errno(), "mincore on the data region")
                if not present[0] & 1:
                    on_fault(i, page, "guest-assisted")
            if write_offset >= 0:
                dirty[first_page + index] = 1                # before the store, like the guest
                scratch.value = progress[0]
                memmove(page + write_offset, scratch_addr, 8)
            else:
                memmove(scratch_addr, page, 8)
            progress[0] += 1
            if progress[0] % npages == 0:
                progress[1] += 1
                if max_passes and progress[1] >= max_passes:
                    progress[3] = True
                    return

    def progress(self) -> list[VcpuProgress]:
        return [VcpuProgress(p[0], p[1], p[2], p[3]) for p in self._progress]

    def dirty_pages(self) -> set[int]:
        return {i for i, d in enumerate(self._dirty) if d}

    def stop(self) -> None:
        """Ask the threads to stop after their current access and join them.

        A thread blocked in a userfaultfd fault returns only once its page arrives:
        the caller must keep resolving faults (or close the uffd) until stop() returns.
        """
        self._stopping = True
        for t in self._threads:
            t.join()
