"""The guest side of the KVM workload: machine code and the memory it runs in.

The guest is a 64-bit long-mode program at CPL3 with identity-mapped page tables
(2 MiB pages), a Linux-style GDT and a busy 64-bit TSS, so it is a valid guest on
VMX/SVM and runs natively (not emulated) under PVM, where only CPL3 long-mode
code runs natively.

Guest physical layout (`GuestLayout`):
    system slot, GPA 0 .. system_size (owned and filled by the host):
        0x1000 PML4, 0x2000 PDPT, 0x3000 GDT, 0x4000 TSS, 0x5000 code,
        0x6000 stack page, 0x7000.. mailboxes (128 B per vCPU, 8 pages), then one
        page directory per GiB, then the dirty bitmap (1 bit per data page), then
        one first-touch bitmap per vCPU (same size, bit = page index in its region),
        then one stall log per vCPU (log_slots u64s: each slow first touch's TSC cycles).
    data slot, GPA DATA_GPA .. + data_size: the migrated RAM (the caller's memory).

Per-vCPU mailbox (128 bytes, written only by that vCPU unless marked host):
    +0 touched  (pages accessed so far), +8 passes (completed passes),
    +16 target  (GPA of the page about to be accessed: published BEFORE the
                 access, so a vCPU that exits on a missing page tells the host
                 which page it wants: the "guest-assisted" fault address),
    +24 done    (1 once the vCPU has finished its passes),
    +32 slow    (first touches of a page that took >= slow_min TSC cycles: the
                 faults this vCPU waited for), +40 slow_cycles (their sum),
    +48 t0      (scratch: the TSC at the current access's start),
    +56 slow_min (host: the threshold in TSC cycles),
    +64 seen    (host: where this vCPU's first-touch bitmap starts, as a bit
                 offset from the mailbox), +72 scratch (rax across rdtsc),
    +80 log     (host: GPA of this vCPU's stall log), +88 log_end (host: its end):
                 slow first touch number k (1-based) stores its cycles at
                 log + 8 * (k - 1) while that is below log_end, so the host can
                 bin every stall the guest timed (StallClocks.guest_hist).
The guest never uses its stack: all vCPUs start with the same rsp.
The guest's clock is the TSC (rdtsc at CPL3: allowed unless CR4.TSD, native
under PVM, where it reads the host's TSC). It times each access from just
before to just after it, so a stall includes the hypervisor's exit and entry
around the fault, which no host-side probe sees on PVM.

Access loop (one iteration = one access; register contract in `entry_registers`):
    1. pick the page index by pattern:
       seq     cursor, cursor+1, ... wrapping at the region end;
       random  uniform: index = (xorshift64() * npages) >> 64;
       hotset  with probability hot_access the index is uniform in the hot set
               (the first hot_npages pages of the region), else uniform in the region;
    2. mailbox.target = region_base + index * page_size; mailbox.t0 = rdtsc;
    3. write with probability write_ratio (a PRNG draw; no draw at ratio 0 or 1):
       set the page's dirty bit first (lock bts; the bitmap is shared between
       vCPUs), then store the touch count at a PRNG-chosen qword at offset
       64..4024, never into the 64-byte page header the source owns;
       otherwise read the header's first qword;
    3b. t1 = rdtsc; set the page's bit in the first-touch bitmap; if it was clear
       and t1 - t0 >= slow_min: slow += 1, slow_cycles += t1 - t0, and
       t1 - t0 goes to the stall log while it has room;
    4. touched += 1; after npages accesses passes += 1; after max_passes passes
       (if set) done = 1, then `ud2`. With no IDT that is a triple fault, which
       every KVM (VMX, SVM, PVM) reports as KVM_EXIT_SHUTDOWN: the guest cannot
       `hlt` at CPL3, and under PVM `out` at CPL3 also ends in a #GP, so this is
       the one exit that works everywhere. The host treats SHUTDOWN with done == 1
       as a clean finish and SHUTDOWN with done == 0 as a guest crash.
The PRNG is xorshift64 (13, 7, 17), seeded per vCPU by the host: a run is fully
determined by (pattern, seed, write_ratio, hot parameters, layout).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from pctop.asm import Assembler

PAGE_2M = 2 << 20
GIB = 1 << 30
DATA_GPA = 1 * GIB          # the data slot's guest physical base (2 MiB aligned)

PML4_GPA, PDPT_GPA, GDT_GPA, TSS_GPA, CODE_GPA, STACK_GPA, MAILBOX_GPA = (
    0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000, 0x7000)
MAILBOX_SIZE = 128
MAILBOX_PAGES = 8           # 256 vCPUs
MB_TOUCHED, MB_PASSES, MB_TARGET, MB_DONE = 0, 8, 16, 24
MB_SLOW, MB_SLOW_CYCLES, MB_T0, MB_SLOW_MIN, MB_SEEN, MB_SCRATCH = 32, 40, 48, 56, 64, 72
MB_LOG, MB_LOG_END = 80, 88
MAX_LOG_SLOTS = 1 << 16     # per vCPU: 512 KiB of the system slot (touched only as used)
PAGE_HEADER = 64            # bytes at the start of each data page that a write never touches
WRITE_OFFSET_MASK = 0xF78   # qword offsets 0..3960, +64 => 64..4024: inside any page >= 4 KiB

# Linux's GDT layout (PVM runs CPL3 code on the host's segments, so match them).
SEL_KERNEL_CS, SEL_KERNEL_DS, SEL_USER_DS, SEL_USER_CS, SEL_TSS = 0x10, 0x18, 0x2B, 0x33, 0x40

# Control registers for 64-bit paging (with these, PVM runs CPL3 code natively instead of emulating it).
CR0 = 0x80050033    # PG | AM | WP | NE | ET | MP | PE
CR4 = 0x10620       # FSGSBASE | OSXMMEXCPT | OSFXSR | PAE
CR4_FSGSBASE = 0x10000
EFER = 0xD01        # NXE | LMA | LME | SCE
RFLAGS = 0x2        # reserved bit 1; interrupts off

PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 1, 2, 4, 0x20, 0x40, 0x80


class GuestParams(NamedTuple):
    pattern: str        # "seq", "random", "hotset"
    page_shift: int     # log2(page size)
    write_ratio: float
    max_passes: int     # 0 = run until stopped


def _xorshift_r12(a: Assembler) -> None:
    """r12 = xorshift64(r12); clobbers rdx."""
    a.emit(b"\x4c\x89\xe2", "mov rdx, r12")
    a.emit(b"\x48\xc1\xe2\x0d", "shl rdx, 13")
    a.emit(b"\x49\x31\xd4", "xor r12, rdx")
    a.emit(b"\x4c\x89\xe2", "mov rdx, r12")
    a.emit(b"\x48\xc1\xea\x07", "shr rdx, 7")
    a.emit(b"\x49\x31\xd4", "xor r12, rdx")
    a.emit(b"\x4c\x89\xe2", "mov rdx, r12")
    a.emit(b"\x48\xc1\xe2\x11", "shl rdx, 17")
    a.emit(b"\x49\x31\xd4", "xor r12, rdx")


def _rdtsc_rax(a: Assembler) -> None:
    """rax = the time-stamp counter; clobbers rdx."""
    a.emit(b"\x0f\x31", "rdtsc")
    a.emit(b"\x48\xc1\xe2\x20", "shl rdx, 32")
    a.emit(b"\x48\x09\xd0", "or rax, rdx")


def build_code(params: GuestParams) -> Assembler:
    """The access loop; see the module docstring and `entry_registers` for registers."""
    a = Assembler()
    a.label("next")
    # 1. page index -> rax
    if params.pattern == "seq":
        a.emit(b"\x4c\x89\xd8", "mov rax, r11")                 # index = cursor
        a.emit(b"\x49\xff\xc3", "inc r11")
        a.emit(b"\x4d\x39\xeb", "cmp r11, r13")
        a.jump(b"\x0f\x82", "picked", "jb picked")
        a.emit(b"\x45\x31\xdb", "xor r11d, r11d")               # wrap to the region start
    elif params.pattern == "random":
        _xorshift_r12(a)
        a.emit(b"\x4c\x89\xe0", "mov rax, r12")
        a.emit(b"\x49\xf7\xe5", "mul r13")                      # rdx = rand * npages >> 64
        a.emit(b"\x48\x89\xd0", "mov rax, rdx")
    elif params.pattern == "hotset":
        _xorshift_r12(a)
        a.emit(b"\x4c\x89\xe0", "mov rax, r12")
        a.emit(b"\x48\xc1\xe8\x0b", "shr rax, 11")              # 53-bit uniform draw
        a.emit(b"\x48\x39\xf8", "cmp rax, rdi")                 # < hot threshold: hot page
        a.jump(b"\x0f\x83", "cold", "jae cold")
        _xorshift_r12(a)
        a.emit(b"\x4c\x89\xe0", "mov rax, r12")
        a.emit(b"\x48\xf7\xe6", "mul rsi")                      # uniform in the hot set
        a.jump(b"\xe9", "scaled", "jmp scaled")
        a.label("cold")
        _xorshift_r12(a)
        a.emit(b"\x4c\x89\xe0", "mov rax, r12")
        a.emit(b"\x49\xf7\xe5", "mul r13")                      # uniform in the region
        a.label("scaled")
        a.emit(b"\x48\x89\xd0", "mov rax, rdx")
    else:
        raise ValueError(f"unknown pattern {params.pattern!r}")
    a.label("picked")
    # 2. target GPA -> rbx, published before the access
    a.emit(b"\x48\x89\xc3", "mov rbx, rax")
    a.emit(b"\x48\xc1\xe3" + bytes([params.page_shift]), f"shl rbx, {params.page_shift}")
    a.emit(b"\x4c\x01\xf3", "add rbx, r14")
    a.emit(b"\x49\x89\x5f" + bytes([MB_TARGET]), f"mov [r15+{MB_TARGET:#x}], rbx")
    # the access's start on the guest's clock; rax (the page index) is needed below and
    # kept in the mailbox, not on the stack: every vCPU has the same rsp
    a.emit(b"\x49\x89\x47" + bytes([MB_SCRATCH]), f"mov [r15+{MB_SCRATCH:#x}], rax")
    _rdtsc_rax(a)
    a.emit(b"\x49\x89\x47" + bytes([MB_T0]), f"mov [r15+{MB_T0:#x}], rax")
    a.emit(b"\x49\x8b\x47" + bytes([MB_SCRATCH]), f"mov rax, [r15+{MB_SCRATCH:#x}]")
    # 3. read or write
    if params.write_ratio < 1.0:
        if params.write_ratio > 0.0:
            _xorshift_r12(a)
            a.emit(b"\x4c\x89\xe2", "mov rdx, r12")
            a.emit(b"\x48\xc1\xea\x0b", "shr rdx, 11")
            a.emit(b"\x4c\x39\xc2", "cmp rdx, r8")             # >= write threshold: read
            a.jump(b"\x0f\x83", "read", "jae read")
        else:
            a.jump(b"\xe9", "read", "jmp read")
    if params.write_ratio > 0.0:
        a.emit(b"\x4c\x01\xc8", "add rax, r9")                  # global page index
        a.emit(b"\xf0\x49\x0f\xab\x02", "lock bts [r10], rax")  # dirty bit, before the store
        if params.write_ratio == 1.0:
            _xorshift_r12(a)                                    # only to pick the offset
        a.emit(b"\x4c\x89\xe2", "mov rdx, r12")
        a.emit(b"\x81\xe2" + struct.pack("<I", WRITE_OFFSET_MASK), f"and edx, {WRITE_OFFSET_MASK:#x}")
        a.emit(b"\x49\x8b\x47" + bytes([MB_TOUCHED]), f"mov rax, [r15+{MB_TOUCHED:#x}]")
        a.emit(b"\x48\x89\x44\x13" + bytes([PAGE_HEADER]), f"mov [rbx+rdx+{PAGE_HEADER:#x}], rax")
        a.jump(b"\xe9", "counted", "jmp counted")
    a.label("read")
    a.emit(b"\x48\x8b\x03", "mov rax, [rbx]")
    a.label("counted")
    # the access's duration: a slow FIRST touch of a page by this vCPU (a fault it
    # waited for) is summed; a later access is slow only if the vCPU was preempted
    _rdtsc_rax(a)
    a.emit(b"\x49\x2b\x47" + bytes([MB_T0]), f"sub rax, [r15+{MB_T0:#x}]")
    a.emit(b"\x48\x89\xda", "mov rdx, rbx")
    a.emit(b"\x4c\x29\xf2", "sub rdx, r14")
    a.emit(b"\x48\xc1\xea" + bytes([params.page_shift]), f"shr rdx, {params.page_shift}")
    a.emit(b"\x49\x03\x57" + bytes([MB_SEEN]), f"add rdx, [r15+{MB_SEEN:#x}]")
    a.emit(b"\x49\x0f\xab\x17", "bts [r15], rdx")     # bit offset from the mailbox
    a.jump(b"\x0f\x82", "fast", "jb fast")  # jc: seen before
    a.emit(b"\x49\x3b\x47" + bytes([MB_SLOW_MIN]), f"cmp rax, [r15+{MB_SLOW_MIN:#x}]")
    a.jump(b"\x0f\x82", "fast", "jb fast")
    a.emit(b"\x49\xff\x47" + bytes([MB_SLOW]), f"inc qword [r15+{MB_SLOW:#x}]")
    a.emit(b"\x49\x01\x47" + bytes([MB_SLOW_CYCLES]), f"add [r15+{MB_SLOW_CYCLES:#x}], rax")
    # the stall log: slot k - 1 for slow touch k, while below log_end (rdx is free here)
    a.emit(b"\x49\x8b\x57" + bytes([MB_SLOW]), f"mov rdx, [r15+{MB_SLOW:#x}]")
    a.emit(b"\x48\xc1\xe2\x03", "shl rdx, 3")
    a.emit(b"\x49\x03\x57" + bytes([MB_LOG]), f"add rdx, [r15+{MB_LOG:#x}]")
    a.emit(b"\x49\x3b\x57" + bytes([MB_LOG_END]), f"cmp rdx, [r15+{MB_LOG_END:#x}]")
    a.jump(b"\x0f\x87", "fast", "ja fast")             # full: the count and sum go on
    a.emit(b"\x48\x89\x42\xf8", "mov [rdx-8], rax")
    a.label("fast")
    # 4. counters, passes, finish
    a.emit(b"\x49\xff\x47" + bytes([MB_TOUCHED]), f"inc qword [r15+{MB_TOUCHED:#x}]")
    a.emit(b"\x48\xff\xc9", "dec rcx")                          # accesses left in this pass
    a.jump(b"\x0f\x85", "next", "jnz next")
    a.emit(b"\x4c\x89\xe9", "mov rcx, r13")
    a.emit(b"\x49\xff\x47" + bytes([MB_PASSES]), f"inc qword [r15+{MB_PASSES:#x}]")
    a.emit(b"\x48\x85\xed", "test rbp, rbp")                    # max passes 0: forever
    a.jump(b"\x0f\x84", "next", "jz next")
    a.emit(b"\x49\x39\x6f" + bytes([MB_PASSES]), f"cmp [r15+{MB_PASSES:#x}], rbp")
    a.jump(b"\x0f\x82", "next", "jb next")
    a.emit(b"\x49\xc7\x47" + bytes([MB_DONE]) + struct.pack("<I", 1), f"mov qword [r15+{MB_DONE:#x}], 1")
    a.emit(b"\x0f\x0b", "ud2")     # deliberate triple fault (no IDT): KVM_EXIT_SHUTDOWN
    a.assemble()
    return a


class VcpuPlan(NamedTuple):
    """What one vCPU accesses: its region of the data slot and its PRNG seed."""
    first_page: int     # global index (in data pages) of the region's first page
    npages: int
    start_index: int    # seq cursor start, relative to the region
    seed: int           # xorshift64 state, never 0


def scale53(probability: float) -> int:
    """A probability as a threshold for a 53-bit uniform draw (1.0 => always)."""
    return min(1 << 53, max(0, round(probability * (1 << 53))))


def entry_registers(plan: VcpuPlan, vcpu: int, params: GuestParams, hot_npages: int,
                    hot_access: float, bitmap_gpa: int) -> dict[str, int]:
    """The guest's register contract at entry (it reads no parameters from memory)."""
    return {
        "r15": mailbox_gpa(vcpu),                               # mailbox
        "r14": DATA_GPA + (plan.first_page << params.page_shift),  # region base
        "r13": plan.npages,
        "r12": plan.seed,
        "r11": plan.start_index,                                # seq cursor
        "r10": bitmap_gpa,                                      # dirty bitmap
        "r9": plan.first_page,                                  # dirty bit of region page 0
        "r8": scale53(params.write_ratio),
        "rsi": max(1, hot_npages),
        "rdi": scale53(hot_access),
        "rbp": params.max_passes,
        "rcx": plan.npages,                                     # accesses left in this pass
        "rsp": STACK_GPA + 0x1000,
    }


class GuestLayout(NamedTuple):
    system_size: int
    pd_gpa: int
    bitmap_gpa: int
    bitmap_size: int
    seen_gpa: int       # vCPU i's first-touch bitmap: seen_gpa + i * bitmap_size
    log_gpa: int        # vCPU i's stall log: log_gpa + i * log_slots * 8
    log_slots: int


def mailbox_gpa(vcpu: int) -> int:
    return MAILBOX_GPA + vcpu * MAILBOX_SIZE


def plan_layout(data_size: int, page_size: int, vcpus: int) -> GuestLayout:
    if vcpus * MAILBOX_SIZE > MAILBOX_PAGES * 0x1000:
        raise ValueError("at most 256 vCPUs")
    pd_gpa = MAILBOX_GPA + MAILBOX_PAGES * 0x1000
    pds = -(-(DATA_GPA + data_size) // GIB)
    bitmap_gpa = pd_gpa + pds * 0x1000
    bitmap_size = -(-(data_size // page_size) // 64) * 8
    seen_gpa = bitmap_gpa + bitmap_size
    log_gpa = seen_gpa + vcpus * bitmap_size
    log_slots = min(data_size // page_size, MAX_LOG_SLOTS)
    end = log_gpa + vcpus * log_slots * 8
    system_size = -(-end // PAGE_2M) * PAGE_2M
    if system_size > DATA_GPA:
        raise ValueError("data region too large for the guest layout")
    return GuestLayout(system_size, pd_gpa, bitmap_gpa, bitmap_size, seen_gpa, log_gpa, log_slots)


def fill_system(mem, layout: GuestLayout, data_size: int, code: bytes) -> None:
    """Write page tables, GDT, TSS and code into the system slot (a writable buffer at GPA 0)."""
    table = PTE_P | PTE_RW | PTE_US | PTE_A
    leaf = table | PTE_D | PTE_PS
    struct.pack_into("<Q", mem, PML4_GPA, PDPT_GPA | table)
    mapped = [(0, layout.system_size), (DATA_GPA, DATA_GPA + data_size)]
    for lo, hi in mapped:
        for gpa in range(lo, hi, PAGE_2M):
            gib = gpa // GIB
            pd = layout.pd_gpa + gib * 0x1000
            struct.pack_into("<Q", mem, PDPT_GPA + gib * 8, pd | table)
            struct.pack_into("<Q", mem, pd + (gpa % GIB) // PAGE_2M * 8, gpa | leaf)
    # GDT: null, kernel CS32 (unused), kernel CS, kernel DS, user CS32, user DS, user CS, -, TSS
    descriptors = {1: 0x00CF9B000000FFFF, 2: 0x00AF9B000000FFFF, 3: 0x00CF93000000FFFF,
                   4: 0x00CFFB000000FFFF, 5: 0x00CFF3000000FFFF, 6: 0x00AFFB000000FFFF}
    for index, value in descriptors.items():
        struct.pack_into("<Q", mem, GDT_GPA + index * 8, value)
    tss_limit = 0x67
    low = (tss_limit | (TSS_GPA & 0xFFFFFF) << 16 | 0x8B << 40   # present, busy 64-bit TSS
           | (TSS_GPA >> 24 & 0xFF) << 56)
    struct.pack_into("<QQ", mem, GDT_GPA + SEL_TSS, low, TSS_GPA >> 32)
    struct.pack_into("<H", mem, TSS_GPA + 0x66, 0x68)            # no I/O permission bitmap
    if len(code) > STACK_GPA - CODE_GPA:
        raise ValueError(f"guest code ({len(code)} bytes) does not fit its page")
    mem[CODE_GPA:CODE_GPA + len(code)] = code


def gdt_limit() -> int:
    return SEL_TSS + 16 - 1


MASK64 = (1 << 64) - 1


class AccessModel:
    """The guest's access loop in Python, draw for draw.

    ThreadWorkload runs it (so both workloads make the same accesses for a seed)
    and the tests check the real guest against it.
    """

    def __init__(self, plan: VcpuPlan, params: GuestParams, hot_npages: int, hot_access: float):
        self.state = plan.seed
        self.cursor = plan.start_index
        self.npages = plan.npages
        self.pattern = params.pattern
        self.hot_npages = max(1, hot_npages)
        self.hot_threshold = scale53(hot_access)
        self.write_threshold = scale53(params.write_ratio)
        self.write_ratio = params.write_ratio

    def _draw(self) -> int:
        x = self.state
        x ^= (x << 13) & MASK64
        x ^= x >> 7
        x ^= (x << 17) & MASK64
        self.state = x
        return x

    def next(self) -> tuple[int, int]:
        """(page index in the region, write offset in the page, or -1 for a read)."""
        if self.pattern == "seq":
            index = self.cursor
            self.cursor = 0 if self.cursor + 1 >= self.npages else self.cursor + 1
        elif self.pattern == "random":
            index = (self._draw() * self.npages) >> 64
        elif (self._draw() >> 11) < self.hot_threshold:   # hotset
            index = (self._draw() * self.hot_npages) >> 64
        else:
            index = (self._draw() * self.npages) >> 64
        if self.write_ratio == 0.0:
            return index, -1
        if self.write_ratio == 1.0:
            return index, PAGE_HEADER + (self._draw() & WRITE_OFFSET_MASK)
        r = self._draw()
        if (r >> 11) >= self.write_threshold:
            return index, -1
        return index, PAGE_HEADER + (r & WRITE_OFFSET_MASK)


def set_long_mode_sregs(sregs, fsgsbase: bool = True) -> None:
    """Fill a kvm.KvmSregs for the CPL3 long-mode guest (flat segments, busy TSS, paging on).

    CR4.FSGSBASE only where the guest CPUID offers it (KVM refuses it otherwise);
    PVM offers it, and its measured native set-up has it."""
    def flat(seg, selector: int, seg_type: int, long_mode: int) -> None:
        seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, seg_type
        seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 3, 1, 1, 0, 0
        seg.l, seg.db = long_mode, 0 if long_mode else 1
    flat(sregs.cs, SEL_USER_CS, 0xB, 1)                      # execute/read, accessed
    for name in ("ds", "es", "fs", "gs", "ss"):
        flat(getattr(sregs, name), SEL_USER_DS, 0x3, 0)      # read/write, accessed
    tr = sregs.tr
    tr.base, tr.limit, tr.selector, tr.type = TSS_GPA, 0x67, SEL_TSS, 0xB   # busy 64-bit TSS
    tr.present, tr.dpl, tr.s, tr.g, tr.l, tr.db, tr.unusable = 1, 0, 0, 0, 0, 0, 0
    sregs.ldt.unusable = 1
    sregs.gdt.base, sregs.gdt.limit = GDT_GPA, gdt_limit()
    sregs.idt.base, sregs.idt.limit = 0, 0                   # no IDT: any exception ends the guest
    sregs.cr0, sregs.cr3, sregs.efer = CR0, PML4_GPA, EFER
    sregs.cr4 = CR4 if fsgsbase else CR4 & ~CR4_FSGSBASE
