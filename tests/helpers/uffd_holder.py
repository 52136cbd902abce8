"""A tiny real userfaultfd process for the monitor's tests.

Run as `python tests/helpers/uffd_holder.py N HOLD_S`: opens a uffd (pctop.engine.uffd),
registers N pages, starts N threads that each touch one missing page (so N
faults block in the kernel), and a handler that waits HOLD_S seconds before
it reads and resolves anything (a deliberately slow handler: the uffd queue
holds N pending faults meanwhile). Then it serves faults until killed.
Prints one line "READY <pid> <uffd fd>" once the threads are started.
Its command name is "uffdhold<pid>" (unique, for --comm).

`python tests/helpers/uffd_holder.py stream N`: N threads fault continuously and a
prompt handler resolves each fault (a steady stream for the eBPF tier).

`python tests/helpers/uffd_holder.py kvm N`: a KVM VM with N vCPUs instead (no uffd),
each vCPU on its own thread named like QEMU's ("CPU i/KVM") that enters
KVM_RUN once with immediate_exit set (KVM then records the thread in
debugfs vcpuN/pid, and returns at once). Prints "READY <pid> <vm fd>".

`holder(n, hold_s)` runs it and always kills it, even when the test fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

PAGE = 4096


def main(n: int, hold_s: float) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from pctop.engine.uffd import AnonMemory, Uffd

    # A command name no other process has, so --comm can be tested: "uffdhold<pid>".
    ctypes.CDLL(None).prctl(15, f"uffdhold{os.getpid()}".encode()[:15], 0, 0, 0)  # PR_SET_NAME
    uffd = Uffd(nonblock=True)
    mem = AnonMemory(n * PAGE)
    uffd.register(mem.addr, n * PAGE)
    src = ctypes.create_string_buffer(b"\x5a" * PAGE)

    def touch(i: int) -> None:
        ctypes.memset(mem.addr + i * PAGE, 1, 1)  # a foreign call: faults without the GIL

    for i in range(n):
        threading.Thread(target=touch, args=(i,), daemon=True, name=f"worker{i}").start()
    print(f"READY {os.getpid()} {uffd.fd}", flush=True)
    time.sleep(hold_s)
    while True:
        if uffd.wait(0.5):
            for msg in uffd.read_faults():
                uffd.copy(msg.address & ~(PAGE - 1), ctypes.addressof(src), PAGE)


def main_stream(n: int, period_s: float = 0.005) -> None:
    """N threads fault forever (one new page every period_s each; pages are
    dropped and fault again), a prompt handler resolves them: a steady fault
    stream that any monitoring window sees."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from pctop.engine.uffd import AnonMemory, Uffd

    pages = 64
    uffd = Uffd(nonblock=True)
    mem = AnonMemory(n * pages * PAGE)
    uffd.register(mem.addr, n * pages * PAGE)
    src = ctypes.create_string_buffer(b"\x5a" * PAGE)

    def touch(k: int) -> None:
        base = mem.addr + k * pages * PAGE
        while True:
            for i in range(pages):
                ctypes.memset(base + i * PAGE, 1, 1)
                time.sleep(period_s)
            mem.drop(k * pages * PAGE, pages * PAGE)

    for k in range(n):
        threading.Thread(target=touch, args=(k,), daemon=True).start()
    print(f"READY {os.getpid()} {uffd.fd}", flush=True)
    while True:
        if uffd.wait(0.5):
            for msg in uffd.read_faults():
                uffd.copy(msg.address & ~(PAGE - 1), ctypes.addressof(src), PAGE)


def main_kvm(n: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from pctop.engine.kvm import Kvm

    libc = ctypes.CDLL(None, use_errno=True)
    vm = Kvm().create_vm()
    vcpus = [vm.create_vcpu(i) for i in range(n)]
    entered = threading.Barrier(n + 1)

    def vcpu_thread(i: int) -> None:
        libc.prctl(15, f"CPU {i}/KVM".encode(), 0, 0, 0)  # PR_SET_NAME
        vcpus[i].run_struct.immediate_exit = 1
        try:
            vcpus[i].run()
        except OSError:
            pass  # EINTR: immediate_exit did its job
        entered.wait()
        threading.Event().wait()

    for i in range(n):
        threading.Thread(target=vcpu_thread, args=(i,), daemon=True).start()
    entered.wait()
    print(f"READY {os.getpid()} {vm.fd}", flush=True)
    threading.Event().wait()


@contextlib.contextmanager
def holder(n: int = 1, hold_s: float = 3600.0, kvm: bool = False, stream: bool = False):
    """Yields (Popen, pid, uffd fd or VM fd) of a running holder; kills it afterwards."""
    args = ["kvm", str(n)] if kvm else ["stream", str(n)] if stream else [str(n), str(hold_s)]
    p = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline().split()
        if len(line) != 3 or line[0] != "READY":
            raise RuntimeError(f"uffd holder did not start: {line!r}, exit {p.poll()}")
        yield p, int(line[1]), int(line[2])
    finally:
        p.kill()
        p.wait(timeout=10)


if __name__ == "__main__":
    if sys.argv[1] == "kvm":
        main_kvm(int(sys.argv[2]))
    elif sys.argv[1] == "stream":
        main_stream(int(sys.argv[2]))
    else:
        main(int(sys.argv[1]), float(sys.argv[2]))
