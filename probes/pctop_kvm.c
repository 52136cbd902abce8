/* pctop probes, part 6 of 6 (after the other five, PROBE_PARTS in
 * pctop/sources/ebpf.py): KVM's tracepoints, all optional (HAVE_* from the loader when
 * tracefs has them). A vCPU's fault start where no exception fires, its index
 * from kvm_exit (VMX/SVM), and KVM_RUN's returns to user space by reason and
 * errno, which time the vCPU-exit strategy's stalls. */

/* ---------------------------------------------------------------- faults inside KVM_RUN */

/* A vCPU fault that reaches the uffd through get_user_pages raises no
 * exception; KVM's own fault events give a weak (address-less) start. */
static __always_inline int on_kvm_fault(void)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct tstate *t = maybe_tracked(tid) ? tstate_of(tid) : 0;
    if (!t) {
        if (!is_target(tgid))
            return 0;
        t = get_tstate(tid, tgid);
        if (!t)
            return 0;
    }
    t->in_run = 1; /* these fire only inside KVM_RUN */
    running_now(tid, t);
    end_unwoken(tid, t); /* a read fault is over once KVM runs this vCPU again */
    t->early_wake_ts = 0;
    if (t->phase == PH_NONE || (t->phase == PH_FAULTED && t->addr == 0)) {
        t->phase = PH_FAULTED;
        t->fault_ts = bpf_ktime_get_ns();
        t->addr = 0;
        t->read_ts = 0;
    }
    return 0;
}

#ifdef HAVE_KVM_MMU_PAGETABLE_WALK
TRACEPOINT_PROBE(kvmmmu, kvm_mmu_pagetable_walk)
{
    return on_kvm_fault();
}
#endif

#ifdef HAVE_KVM_PAGE_FAULT
TRACEPOINT_PROBE(kvm, kvm_page_fault)
{
    return on_kvm_fault();
}
#endif

#ifdef HAVE_KVM_EXIT
/* VMX/SVM only (never fires under PVM; its cost there is every VM exit on the
 * host, one array lookup for threads pctop does not follow). For a followed
 * vCPU thread: its index from vcpu_id, also for a VM that was running before
 * pctop started, and a stage-2 fault exit starts a weak fault candidate a
 * little before kvm_page_fault would. */
TRACEPOINT_PROBE(kvm, kvm_exit)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    if (!maybe_tracked(tid))
        return 0;
    struct tstate *t = tstate_of(tid);
    if (!t)
        return 0;
    if (t->vcpu < 0) {
        t->vcpu = args->vcpu_id;
        struct vcpu_info vi = {.tgid = t->tgid, .vcpu = args->vcpu_id, .how = HOW_KVM_EXIT};
        vcpus.update(&tid, &vi);
    }
    u32 reason = args->exit_reason;
    if ((args->isa == KVM_ISA_VMX && (reason & 0xffff) == VMX_EXIT_EPT_VIOLATION) ||
        (args->isa == KVM_ISA_SVM && reason == SVM_EXIT_NPF))
        return on_kvm_fault();
    return 0;
}
#endif

/* ---------------------------------------------------------------- KVM_RUN returns */

#ifdef HAVE_KVM_USERSPACE_EXIT
TRACEPOINT_PROBE(kvm, kvm_userspace_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct tstate *t = tstate_of(tid);
    if (!t)
        return 0; /* KVM_RUN entry not seen: not followed */
    running_now(tid, t);
    t->in_run = 0;
    if (t->phase == PH_FAULTED && t->addr == 0)
        clear_fault(t); /* a weak candidate that never slept */
    u32 reason = args->reason;
    /* the field holds KVM_RUN's return value: 0 or -errno */
    int ret = args->errno;
    u32 err = ret < 0 ? -ret : 0;
    struct exit_key k = {.tid = tid, .tgid = tgid, .epoch = (u32)cfg(CFG_EPOCH),
                         .code = (err << 16) | (reason & 0xffff)};
    u64 *c = exits.lookup(&k);
    if (c) {
        __sync_fetch_and_add(c, 1);
    } else {
        u64 one = 1;
        exits.update(&k, &one);
    }
    /* a memory-fault exit: EFAULT with KVM_EXIT_MEMORY_FAULT, or with
     * exit_reason 0 as kernels without memory_fault data report it */
    if (err == ERR_EFAULT && (reason == KVM_EXIT_MEMORY_FAULT || reason == KVM_EXIT_UNKNOWN)) {
        struct tstats *s = get_stats(tid, tgid);
        if (s)
            __sync_fetch_and_add(&s->memory_fault_exits, 1);
        t->efault_ts = bpf_ktime_get_ns();
        t->efault_open = 1;
    }
    return 0;
}
#endif
