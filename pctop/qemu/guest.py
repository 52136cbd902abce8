"""The tiny QEMU guest: a boot sector that keeps writing to its memory.

SeaBIOS loads the 512-byte sector at 0x7C00 and jumps to it in real mode. The
sector switches to 32-bit protected mode (flat 4 GiB segments, paging off, so
no page tables are needed). Every vCPU runs the same sector:

    index = atomic_fetch_add(mailbox.counter, 1)    # the boot vCPU arrives first: 0
    if index == 0:
        mailbox.magic = "PCTG"
        wake the other vCPUs: a far jump to 0x7C00 at 0x7000, then INIT and
        SIPI (vector 7 = 0x7000) to all but self through the local APIC
    my region = region_base + index * region_size / vcpus, region_size / vcpus long
    pass = 0
    forever:
        pass += 1
        mailbox.passes[index] = pass
        for page in my region:
            page[0..3] = pass       # one dword per 4 KiB page: the page is dirty

So the pages the vCPUs keep dirtying are exactly the region plus the mailbox
page, and the dword at the start of every region page says in which pass it
was last written. Interrupts stay off (`cli`), there is no stack use and no
BIOS call after the boot, so nothing else in guest memory changes. Each vCPU
writes its part of the region in order, page after page, which under post-copy
makes it fault on every page that has not arrived yet.

Guest physical layout:
    0x6000          mailbox: +0 magic b"PCTG", +4 arrival counter,
                    +0x40 passes of vCPU 0 (u32), +0x44 of vCPU 1, ...
    0x7000          the other vCPUs' start (SIPI vector 7): jmp 0000:7C00
    0x7C00          this sector: code, then the GDT and its descriptor
    region_base ..  the written region (default 1 MiB .. 17 MiB)

Under PVM (KVM without VMX/SVM, as on the project's test VMs) real mode and 32-bit flat code are emulated by KVM,
every instruction; under VMX/SVM or TCG it runs at full speed. Either way the
guest's memory accesses go through the host mapping QEMU registers with
userfaultfd on the destination.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from pctop.asm import Assembler

LOAD_ADDR = 0x7C00
MAILBOX_GPA = 0x6000
MB_MAGIC, MB_COUNTER, MB_PASSES = 0, 4, 0x40   # passes: one u32 per vCPU from +0x40
AP_START = 0x7000          # SIPI vector 7: where the other vCPUs start, in real mode
LAPIC_ICR_LOW = 0xFEE00300
ICR_INIT_OTHERS = 0x000C4500   # all excluding self, level assert, INIT
ICR_SIPI_OTHERS = 0x000C4600 | (AP_START >> 12)
MAX_VCPUS = 16
MAGIC = b"PCTG"
PAGE = 4096
SECTOR = 512
DEFAULT_REGION_BASE = 1 << 20
DEFAULT_REGION_SIZE = 16 << 20

SEL_CODE32, SEL_DATA32 = 0x08, 0x10
# Flat 4 GiB segments: base 0, limit 0xFFFFF with 4 KiB granularity, 32-bit (D=1).
GDT = (0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)   # null, code (exec/read), data (read/write)


class GuestImage(NamedTuple):
    sector: bytes          # the 512-byte boot sector (ends with 55 AA)
    listing: str           # offset, bytes and assembly of every instruction
    region_base: int
    region_size: int
    vcpus: int = 1

    @property
    def region_pages(self) -> int:
        return self.region_size // PAGE

    def dirtied_pages(self) -> frozenset[int]:
        """Guest page frame numbers the running guest keeps writing."""
        first = self.region_base // PAGE
        return frozenset(range(first, first + self.region_pages)) | {MAILBOX_GPA // PAGE}


def _u16(v: int) -> bytes:
    return struct.pack("<H", v)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def _delay(a: Assembler, name: str, count: int) -> None:
    """A busy wait between the INIT and SIPI IPIs (the MP spec's pauses)."""
    a.emit(b"\xb9" + _u32(count), f"mov ecx, {count}")
    a.label(name)
    a.emit(b"\x49", "dec ecx")
    a.jump(b"\x0f\x85", name, f"jnz {name}")


def build_boot_sector(region_base: int = DEFAULT_REGION_BASE, region_size: int = DEFAULT_REGION_SIZE,
                      vcpus: int = 1) -> GuestImage:
    """Assemble the sector; region_base/size must be 4 KiB multiples above 1 MiB, and
    the region must split into whole pages per vCPU."""
    if region_base % PAGE or region_size % PAGE or region_size <= 0:
        raise ValueError("region base and size must be positive multiples of 4 KiB")
    if region_base < 1 << 20 or region_base + region_size > 0xE0000000:
        raise ValueError("the region must start at or above 1 MiB and stay in low RAM")
    if not 1 <= vcpus <= MAX_VCPUS or region_size % (vcpus * PAGE):
        raise ValueError(f"1..{MAX_VCPUS} vCPUs, each with a whole number of region pages")
    share = region_size // vcpus
    a = Assembler()
    # ---- 16-bit real mode, at 0x7C00 (the other vCPUs arrive here too) ----
    a.emit(b"\xfa", "cli")
    a.emit(b"\x31\xc0", "xor ax, ax")
    a.emit(b"\x8e\xd8", "mov ds, ax")
    gdt_desc_fixup = len(a.insns)
    a.emit(b"\x0f\x01\x16" + _u16(0), "lgdt [gdt_desc]")
    a.emit(b"\xe4\x92", "in al, 0x92")                    # fast A20 gate: reach above 1 MiB
    a.emit(b"\x0c\x02", "or al, 2")
    a.emit(b"\xe6\x92", "out 0x92, al")
    a.emit(b"\x0f\x20\xc0", "mov eax, cr0")
    a.emit(b"\x0c\x01", "or al, 1")                       # CR0.PE
    a.emit(b"\x0f\x22\xc0", "mov cr0, eax")
    far_jmp_fixup = len(a.insns)
    a.emit(b"\xea" + _u16(0) + _u16(SEL_CODE32), f"jmp {SEL_CODE32:#x}:pm32")
    # ---- 32-bit protected mode ----
    a.label("pm32")
    a.emit(b"\x66\xb8" + _u16(SEL_DATA32), f"mov ax, {SEL_DATA32:#x}")
    a.emit(b"\x8e\xd8", "mov ds, ax")
    a.emit(b"\x8e\xc0", "mov es, ax")
    a.emit(b"\x8e\xd0", "mov ss, ax")
    a.emit(b"\xb8" + _u32(1), "mov eax, 1")
    counter = MAILBOX_GPA + MB_COUNTER
    a.emit(b"\xf0\x0f\xc1\x05" + _u32(counter), f"lock xadd [{counter:#x}], eax")  # eax = my index
    if vcpus > 1:
        a.emit(b"\x85\xc0", "test eax, eax")
        a.jump(b"\x0f\x85", "work", "jnz work")                 # not the boot vCPU
    a.emit(b"\xc7\x05" + _u32(MAILBOX_GPA + MB_MAGIC) + MAGIC,
           f"mov dword [{MAILBOX_GPA + MB_MAGIC:#x}], '{MAGIC.decode()}'")
    if vcpus > 1:
        # jmp 0000:7C00 at the SIPI start address: EA 00 7C 00 00
        a.emit(b"\xc7\x05" + _u32(AP_START) + b"\xea" + _u16(LOAD_ADDR) + b"\x00",
               f"mov dword [{AP_START:#x}], 0x00{LOAD_ADDR:04x}ea")
        a.emit(b"\xc6\x05" + _u32(AP_START + 4) + b"\x00", f"mov byte [{AP_START + 4:#x}], 0")
        a.emit(b"\xc7\x05" + _u32(LAPIC_ICR_LOW) + _u32(ICR_INIT_OTHERS),
               f"mov dword [{LAPIC_ICR_LOW:#x}], {ICR_INIT_OTHERS:#x}")   # INIT to all but self
        _delay(a, "after_init", 100000)
        for i in range(2):                                        # SIPI twice, as the MP spec says
            a.emit(b"\xc7\x05" + _u32(LAPIC_ICR_LOW) + _u32(ICR_SIPI_OTHERS),
                   f"mov dword [{LAPIC_ICR_LOW:#x}], {ICR_SIPI_OTHERS:#x}")
            _delay(a, f"after_sipi{i}", 10000)
        a.emit(b"\x31\xc0", "xor eax, eax")                     # the boot vCPU is index 0
    a.label("work")
    a.emit(b"\x89\xc5", "mov ebp, eax")                         # ebp = index
    a.emit(b"\x69\xc8" + _u32(share), f"imul ecx, eax, {share:#x}")
    a.emit(b"\x81\xc1" + _u32(region_base), f"add ecx, {region_base:#x}")  # ecx = my region
    a.emit(b"\x8d\xb1" + _u32(share), f"lea esi, [ecx+{share:#x}]")       # esi = its end
    a.emit(b"\x31\xdb", "xor ebx, ebx")                         # ebx = pass
    a.label("outer")
    a.emit(b"\x43", "inc ebx")
    passes = MAILBOX_GPA + MB_PASSES
    a.emit(b"\x89\x1c\xad" + _u32(passes), f"mov [ebp*4+{passes:#x}], ebx")
    a.emit(b"\x89\xcf", "mov edi, ecx")
    a.label("inner")
    a.emit(b"\x89\x1f", "mov [edi], ebx")                       # dirty this page
    a.emit(b"\x81\xc7" + _u32(PAGE), f"add edi, {PAGE:#x}")
    a.emit(b"\x39\xf7", "cmp edi, esi")
    a.jump(b"\x0f\x82", "inner", "jb inner")
    a.jump(b"\xe9", "outer", "jmp outer")
    # ---- data: GDT (8-byte aligned) and its descriptor ----
    while a.size % 8:
        a.emit(b"\x90", "nop (align)")
    a.label("gdt")
    for i, d in enumerate(GDT):
        a.emit(struct.pack("<Q", d), f"gdt[{i}] = {d:#018x}")
    a.label("gdt_desc")
    gdt_linear = LOAD_ADDR + a.labels["gdt"]
    a.emit(_u16(len(GDT) * 8 - 1) + _u32(gdt_linear), f"gdt_desc: limit {len(GDT) * 8 - 1}, base {gdt_linear:#x}")
    code = bytearray(a.assemble())
    # Absolute addresses the 16-bit code needs (the Assembler resolves only rel32 jumps).
    _patch(a, code, gdt_desc_fixup, 3, _u16(LOAD_ADDR + a.labels["gdt_desc"]))
    _patch(a, code, far_jmp_fixup, 1, _u16(LOAD_ADDR + a.labels["pm32"]))
    if len(code) > SECTOR - 2:
        raise ValueError(f"boot sector code is {len(code)} bytes, more than {SECTOR - 2}")
    sector = bytes(code) + b"\0" * (SECTOR - 2 - len(code)) + b"\x55\xaa"
    return GuestImage(sector, a.listing(), region_base, region_size, vcpus)


def _patch(a: Assembler, code: bytearray, index: int, pos: int, value: bytes) -> None:
    insn = a.insns[index]
    data = insn.data[:pos] + value + insn.data[pos + len(value):]
    a.insns[index] = insn._replace(data=data)
    code[insn.offset:insn.offset + len(data)] = data


def write_disk_image(path: str, image: GuestImage) -> None:
    """A raw 1 MiB disk image whose first sector is the guest (SeaBIOS boots it)."""
    with open(path, "wb") as f:
        f.write(image.sector)
        f.truncate(1 << 20)
