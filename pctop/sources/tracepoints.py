"""The tracepoints pctop's eBPF probes (probes/pctop.bpf.c) attach.

`pctop doctor` imports these lists to say what is missing, and EbpfSource
compiles the optional probes only when tracefs has them; keep this module
free of imports (no bcc).

REQUIRED: without any of them a uffd stall cannot be reconstructed.
OPTIONAL: KVM's; absent when the kvm module is not loaded. kvm_userspace_exit
counts KVM_RUN returns by reason and errno (and vCPU-exit mode stalls);
kvm_page_fault (VMX/SVM) and kvm_mmu_pagetable_walk (shadow paging, PVM) mark
when a vCPU's fault started when it reaches the uffd through get_user_pages,
where no exceptions:page_fault_* fires. Without them the stall is timed from
the vCPU's sleep instead. kvm_exit (VMX/SVM) gives a followed vCPU thread its
index (vcpu_id) and marks an EPT-violation / NPF exit as a fault start.
"""

# Needed only where the kernel lacks bpf_task_pt_regs: elsewhere the probes take
# read()'s fd and buffer from its exit's saved registers (EbpfSource.reads_at_exit).
READ_ENTRY = "syscalls:sys_enter_read"

REQUIRED: tuple[str, ...] = (
    "exceptions:page_fault_user",
    "exceptions:page_fault_kernel",
    "sched:sched_switch",
    "sched:sched_waking",
    "sched:sched_process_exit",
    "syscalls:sys_enter_ioctl",
    "syscalls:sys_exit_ioctl",
    READ_ENTRY,
    "syscalls:sys_exit_read",
    "syscalls:sys_exit_userfaultfd",
)

OPTIONAL: tuple[str, ...] = (
    "kvm:kvm_userspace_exit",
    "kvm:kvm_page_fault",
    "kvm:kvm_exit",
    "kvmmmu:kvm_mmu_pagetable_walk",
)

# The C macro that enables each optional probe in probes/pctop.bpf.c.
OPTIONAL_MACROS: dict[str, str] = {
    "kvm:kvm_userspace_exit": "HAVE_KVM_USERSPACE_EXIT",
    "kvm:kvm_page_fault": "HAVE_KVM_PAGE_FAULT",
    "kvm:kvm_exit": "HAVE_KVM_EXIT",
    "kvmmmu:kvm_mmu_pagetable_walk": "HAVE_KVM_MMU_PAGETABLE_WALK",
}
