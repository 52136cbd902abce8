"""vCPU identity and what a running target set up, read from /proc and debugfs.

Thread names and uffd/vCPU fds are real (this test process names its own
threads, opens a real uffd and, where /dev/kvm exists, a real vCPU). Only the
debugfs precedence test uses a fake debugfs tree: KVM writes vcpuN/pid itself
and cannot be made to disagree with the other sources.
"""

from __future__ import annotations

import os
import threading

import pytest

from pctop.hostpaths import DEFAULT, HostPaths
from pctop.sources.identity import fallback_vcpus, identify, merge_identities, target_fds, uffd_ranges
from pctop.sources.readings import VcpuIdentity

VMM_NAMES = {"CPU 1/KVM": 1, "fc_vcpu 2": 2, "vcpu3": 3, "crosvm_vcpu4": 4, "vcpu 5": 5}


@pytest.fixture
def named_threads():
    """Real threads of this process named like each VMM's vCPU threads, plus a non-vCPU one."""
    from pctop.engine.workload import set_thread_name

    stop = threading.Event()
    tids: dict[str, int] = {}
    ready = threading.Barrier(len(VMM_NAMES) + 2)

    def body(name: str) -> None:
        set_thread_name(name)
        tids[name] = threading.get_native_id()
        ready.wait()
        stop.wait()

    threads = [threading.Thread(target=body, args=(n,), daemon=True) for n in [*VMM_NAMES, "io-worker"]]
    for t in threads:
        t.start()
    try:
        ready.wait(timeout=10)
        yield tids
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def test_thread_names_of_every_vmm_give_the_vcpu_index(named_threads):
    found = fallback_vcpus(DEFAULT, os.getpid())
    for name, vcpu in VMM_NAMES.items():
        assert found[named_threads[name]] == (vcpu, "thread_name"), name
    assert named_threads["io-worker"] not in found


def test_identify_merges_probe_knowledge_with_names(named_threads):
    tid1 = named_threads["CPU 1/KVM"]
    tid2 = named_threads["fc_vcpu 2"]
    # The probes saw KVM_CREATE_VCPU for index 7 on the thread named "CPU 1/KVM".
    got = {i.tid: i for i in identify(os.getpid(), {tid1: (7, "kvm_create_vcpu")})}
    assert got[tid1] == VcpuIdentity(os.getpid(), tid1, 7, "kvm_create_vcpu")
    assert got[tid2].vcpu == 2 and got[tid2].how == "thread_name"


def test_a_less_trusted_source_never_overrides_a_more_trusted_one():
    kernel = {100: (0, "kvm_create_vcpu")}
    debugfs = {100: (5, "debugfs"), 101: (1, "debugfs")}
    names = {101: (9, "thread_name"), 102: (0, "thread_name"), 103: (3, "thread_name")}
    got = {i.tid: (i.vcpu, i.how) for i in merge_identities(42, names, debugfs, kernel)}
    assert got == {100: (0, "kvm_create_vcpu"),  # kernel beats debugfs for the same thread
                   101: (1, "debugfs"),          # debugfs beats the name
                   103: (3, "thread_name")}      # 102 would be a second "vCPU 0": dropped


def test_threads_that_are_gone_are_dropped():
    got = merge_identities(42, {100: (0, "debugfs"), 101: (1, "debugfs")}, alive=[101])
    assert [(i.tid, i.vcpu) for i in got] == [(101, 1)]


def test_debugfs_beats_thread_names(tmp_path, named_threads):
    # Fake debugfs: only the path layout is KVM's; see the module docstring.
    pid = os.getpid()
    tid = named_threads["vcpu3"]
    d = tmp_path / "kernel" / "debug" / "kvm" / f"{pid}-11" / "vcpu6"
    d.mkdir(parents=True)
    (d / "pid").write_text(f"{tid}\n")
    (tmp_path / "kernel" / "debug" / "kvm" / f"{pid + 1}-12").mkdir()  # another process's VM
    paths = HostPaths(proc=DEFAULT.proc, sys=str(tmp_path))
    found = fallback_vcpus(paths, pid)
    assert found[tid] == (6, "debugfs")
    assert found[named_threads["fc_vcpu 2"]] == (2, "thread_name")


def test_target_fds_and_registered_ranges_of_a_real_uffd():
    from pctop.engine.uffd import AnonMemory, Uffd

    size = 64 * 4096
    with AnonMemory(size) as mem, Uffd() as uf:
        assert not any(lo <= mem.addr + 4096 < hi for lo, hi in uffd_ranges(DEFAULT, os.getpid()))
        uf.register(mem.addr + 4096, 16 * 4096)
        uffds, _ = target_fds(DEFAULT, os.getpid())
        assert uf.fd in uffds
        ranges = uffd_ranges(DEFAULT, os.getpid())
        assert (mem.addr + 4096, mem.addr + 17 * 4096) in ranges
        assert not any(lo <= mem.addr < hi for lo, hi in ranges)  # the unregistered first page
        uf.unregister(mem.addr + 4096, 16 * 4096)
        assert (mem.addr + 4096, mem.addr + 17 * 4096) not in uffd_ranges(DEFAULT, os.getpid())


@pytest.mark.kvm
def test_vcpu_fds_name_their_index():
    from pctop.engine import kvm

    why = kvm.kvm_unavailable_reason()
    if why:
        pytest.skip(f"no usable /dev/kvm: {why}")
    k = kvm.Kvm()
    vm = k.create_vm()
    try:
        v3 = vm.create_vcpu(3)
        _, vcpu_fds = target_fds(DEFAULT, os.getpid())
        assert vcpu_fds[v3.fd] == 3
    finally:
        vm.close()
        k.close()


def test_a_process_that_is_gone_has_nothing():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(p.stdout)
    assert target_fds(DEFAULT, pid) == ([], {})
    assert uffd_ranges(DEFAULT, pid) == []
    assert identify(pid, {}) == ()
