"""pctop.engine.kvm: struct layouts (the x86-64 ABI of <linux/kvm.h>) and real /dev/kvm."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading

import pytest

from pctop.engine import kvm as k

needs_kvm = pytest.mark.skipif(not os.access(k.DEV_KVM, os.R_OK | os.W_OK),
                               reason="/dev/kvm is missing or not accessible")


def _ioc(direction: int, nr: int, size: int) -> int:
    """asm-generic/ioctl.h: dir<<30 | size<<16 | 'KVMIO'<<8 | nr (dir: 1 write, 2 read)."""
    return direction << 30 | size << 16 | 0xAE << 8 | nr


@pytest.mark.parametrize("struct_type, size", [
    (k.KvmRegs, 144), (k.KvmSegment, 24), (k.KvmDtable, 16), (k.KvmSregs, 312),
    (k.KvmUserspaceMemoryRegion, 32), (k.KvmMsrEntry, 16), (k.KvmCpuidEntry2, 40),
])
def test_struct_sizes(struct_type, size):
    assert ctypes.sizeof(struct_type) == size


def test_kvm_run_offsets():
    assert k.KvmRun.immediate_exit.offset == 1
    assert k.KvmRun.exit_reason.offset == 8
    assert k.KvmRun.exit.offset == 32
    run = k.KvmRun()
    base = ctypes.addressof(run)
    assert ctypes.addressof(run.exit.memory_fault) - base == 32
    assert k.KvmRunMemoryFault.gpa.offset + 32 == 40
    assert k.KvmRunMemoryFault.size.offset + 32 == 48
    assert k.KvmRunIo.port.offset + 32 == 34
    assert k.KvmRunIo.data_offset.offset + 32 == 40
    assert k.KvmSregs.cr0.offset == 224 and k.KvmSregs.efer.offset == 264


def test_ioctl_numbers_agree_with_struct_sizes():
    # Each _IOW/_IOR number encodes its argument's size: a wrong layout shows up here.
    assert k.KVM_SET_USER_MEMORY_REGION == _ioc(1, 0x46, ctypes.sizeof(k.KvmUserspaceMemoryRegion))
    assert k.KVM_GET_REGS == _ioc(2, 0x81, ctypes.sizeof(k.KvmRegs))
    assert k.KVM_SET_REGS == _ioc(1, 0x82, ctypes.sizeof(k.KvmRegs))
    assert k.KVM_GET_SREGS == _ioc(2, 0x83, ctypes.sizeof(k.KvmSregs))
    assert k.KVM_SET_SREGS == _ioc(1, 0x84, ctypes.sizeof(k.KvmSregs))
    assert k.KVM_SET_MSRS == _ioc(1, 0x89, 8) and k.KVM_GET_MSRS == _ioc(3, 0x88, 8)
    assert k.KVM_SET_CPUID2 == _ioc(1, 0x90, 8) and k.KVM_GET_SUPPORTED_CPUID == _ioc(3, 0x05, 8)
    assert k.KVM_SET_SIGNAL_MASK == _ioc(1, 0x8B, 4)


def test_vendor_from_loaded_module(tmp_path, monkeypatch):
    monkeypatch.setattr(k.os.path, "exists", lambda p: p == k.DEV_KVM or os.path.lexists(p))
    assert k.kvm_vendor(str(tmp_path)) == "none"
    (tmp_path / "kvm_pvm").mkdir()
    assert k.kvm_vendor(str(tmp_path)) == "pvm"
    (tmp_path / "kvm_amd").mkdir()
    assert k.kvm_vendor(str(tmp_path)) == "svm"


def test_unavailable_reason_names_the_missing_device(tmp_path):
    reason = k.kvm_unavailable_reason(str(tmp_path / "kvm"))
    assert reason is not None and "does not exist" in reason
    (tmp_path / "kvm").write_text("")
    reason = k.kvm_unavailable_reason(str(tmp_path / "kvm"))   # a file, not the KVM device
    assert reason is not None and "cannot use" in reason


@pytest.mark.kvm
@needs_kvm
def test_capabilities_and_cpuid():
    assert k.kvm_unavailable_reason() is None
    kvm = k.Kvm()
    try:
        caps = kvm.capabilities()
        assert caps.api_version == 12
        assert caps.vendor in ("vmx", "svm", "pvm")
        assert caps.immediate_exit      # stop() relies on it
        cpuid = kvm.supported_cpuid()
        leaves = {e.function for e in cpuid.entries[:cpuid.nent]}
        assert 0 in leaves and 0x80000001 in leaves
        ext = next(e for e in cpuid.entries[:cpuid.nent] if e.function == 0x80000001)
        assert ext.edx & (1 << 29), "long mode (CPUID.80000001H:EDX.LM) must be offered"
    finally:
        kvm.close()


@pytest.mark.kvm
@needs_kvm
@pytest.mark.timeout(60)
@pytest.mark.parametrize("immediate_exit", [False, True])
def test_kick_interrupts_kvm_run_from_another_thread(immediate_exit):
    """A vCPU spinning in guest mode leaves KVM_RUN with EINTR when its thread gets
    KICK_SIGNAL (blocked in the thread, unblocked only inside KVM_RUN); kick()
    adds immediate_exit for the case where the thread is not in KVM_RUN yet."""
    import mmap

    from pctop.engine import guest as g
    kvm = k.Kvm()
    vm = kvm.create_vm()
    try:
        layout = g.plan_layout(2 << 20, 4096, 1)
        system = mmap.mmap(-1, layout.system_size)
        # loop: inc qword [r15]; jmp loop  -- a counter the host can watch
        g.fill_system(system, layout, 2 << 20, b"\x49\xff\x07\xeb\xfb")
        vm.set_user_memory_region(0, 0, layout.system_size,
                                  ctypes.addressof(ctypes.c_char.from_buffer(system)))
        result: dict[str, object] = {}
        started = threading.Event()

        def vcpu_thread() -> None:
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid(kvm.supported_cpuid())
            sregs = vcpu.get_sregs()
            g.set_long_mode_sregs(sregs)
            vcpu.set_sregs(sregs)
            regs = k.KvmRegs(rip=g.CODE_GPA, rflags=g.RFLAGS, rsp=g.STACK_GPA + 0x1000,
                             r15=g.MAILBOX_GPA)
            vcpu.set_regs(regs)
            vcpu.prepare_kick()
            result["vcpu"] = vcpu
            started.set()
            result["errno"] = vcpu.run_errno()
            result["rip"] = vcpu.get_regs().rip

        t = threading.Thread(target=vcpu_thread)
        t.start()
        assert started.wait(10)
        vcpu = result["vcpu"]
        counter = ctypes.c_uint64.from_buffer(system, g.MAILBOX_GPA)
        while counter.value < 1000:     # the guest is running (bounded by the test timeout)
            pass
        if immediate_exit:
            vcpu.kick()
        else:
            signal.pthread_kill(vcpu.thread_ident, k.KICK_SIGNAL)
        t.join(30)
        assert not t.is_alive()
        assert result["errno"] == errno.EINTR
        assert result["rip"] in (g.CODE_GPA, g.CODE_GPA + 3)   # stopped inside the guest loop
        del counter
    finally:
        vm.close()
        kvm.close()


@pytest.mark.kvm
@needs_kvm
def test_msrs_round_trip():
    kvm = k.Kvm()
    vm = kvm.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.supported_cpuid())
        kernel_gs_base = 0xC0000102
        assert vcpu.set_msrs({kernel_gs_base: 0x1234_5000}) == 1
        assert vcpu.get_msr(kernel_gs_base) == 0x1234_5000
    finally:
        vm.close()
        kvm.close()


def test_native_helper_builds_into_the_cache_keyed_by_its_source(tmp_path, monkeypatch):
    """native/kvm_run.c is compiled on first use into $XDG_CACHE_HOME/pctop; its TSC
    pair reads CLOCK_MONOTONIC like time.monotonic_ns. PCTOP_NATIVE=0 turns it off
    (the engine then times KVM_RUN in Python and says "python")."""
    import shutil
    import time

    monkeypatch.setenv("PCTOP_NATIVE", "0")
    assert k._load_native() is None and "PCTOP_NATIVE" in k.native_error
    monkeypatch.delenv("PCTOP_NATIVE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the native helper cannot be built here")
    nat = k._load_native()
    assert nat is not None, k.native_error
    (built,) = (tmp_path / "pctop").glob("kvm_run-*.so")
    assert nat.path == str(built)
    ns, tsc = ctypes.c_int64(), ctypes.c_uint64()
    before = time.monotonic_ns()
    width = nat.tsc_pair(ctypes.byref(ns), ctypes.byref(tsc))
    after = time.monotonic_ns()
    assert before <= ns.value <= after and 0 <= width <= after - before and tsc.value > 0
    assert k._load_native().path == nat.path   # the second use finds the build
