"""A tiny x86-64 assembler for hand-encoded guest code: the reference engine's
guest (pctop.engine.guest) and the QEMU demo's boot sector (pctop.qemu.guest).
Each instruction is emitted as bytes with its text for the listing; rel32 jumps
to labels are resolved at the end."""

from __future__ import annotations

import struct
from typing import NamedTuple


class Instruction(NamedTuple):
    offset: int
    data: bytes
    asm: str


class Assembler:
    """Collects hand-encoded instructions; resolves rel32 jumps to labels at the end."""

    def __init__(self) -> None:
        self.insns: list[Instruction] = []
        self.labels: dict[str, int] = {}
        self._fixups: list[tuple[int, int, str]] = []   # (insn index, rel32 position, label)
        self.size = 0

    def emit(self, data: bytes, asm: str) -> None:
        self.insns.append(Instruction(self.size, data, asm))
        self.size += len(data)

    def label(self, name: str) -> None:
        self.labels[name] = self.size

    def jump(self, opcode: bytes, label: str, asm: str) -> None:
        """A jmp/jcc with a rel32 displacement to `label` (filled in by assemble())."""
        self._fixups.append((len(self.insns), len(opcode), label))
        self.emit(opcode + b"\0\0\0\0", asm)

    def assemble(self) -> bytes:
        for index, pos, label in self._fixups:
            insn = self.insns[index]
            rel = self.labels[label] - (insn.offset + len(insn.data))
            data = insn.data[:pos] + struct.pack("<i", rel)
            self.insns[index] = insn._replace(data=data)
        return b"".join(insn.data for insn in self.insns)

    def listing(self) -> str:
        return "\n".join(f"{i.offset:04x}  {i.data.hex(' '):<32} {i.asm}" for i in self.insns)
