/* pctop probes: post-copy (userfaultfd) stalls and KVM_RUN exits, from
 * tracepoints only (no kprobes/fentry, which many kernels lack).
 *
 * Part 3 of 6 (after pctop_defs.h and pctop_state.c): the faulting thread's
 * side (its fault, its sleep, its wake-up, running again); the handler's side
 * (uffd reads and ioctls) follows in pctop_handler.c, uffds that change hands
 * in pctop_fds.c, KVM's own tracepoints in pctop_kvm.c.
 * Compiled by bcc at run time (pctop/sources/ebpf.py). Optional tracepoints
 * are guarded by HAVE_* macros that the loader defines when tracefs has them.
 *
 * The life of one fault, as reconstructed here:
 *   1. start: exceptions:page_fault_user/kernel at an address inside a range
 *      the process registered with UFFDIO_REGISTER ("strong" candidate, we
 *      know the host address). A vCPU whose fault goes through get_user_pages
 *      (VMX/SVM stage-2, PVM native guests) raises no exception: then
 *      kvm:kvm_page_fault / kvmmmu:kvm_mmu_pagetable_walk, or just the sleep
 *      inside KVM_RUN, start a "weak" candidate (address unknown).
 *   2. sched_switch with prev = the thread, sleeping: it stalled.
 *   3. a handler read()s the uffd: each 32-byte uffd_msg names the thread
 *      (ptid, with UFFD_FEATURE_THREAD_ID) or at least the page.
 *   4. sched_waking of the thread while the waker (current) is inside a
 *      resolving uffd ioctl (COPY/ZEROPAGE/CONTINUE/WAKE/...) whose range
 *      covers the fault address: it is a uffd stall, and it is resolved.
 *      Any other wake-up (signal, I/O, IRQ) means the sleep was not ours,
 *      unless a handler read the fault's message: then it was in
 *      handle_userfault, and a signal ends that wait (end_unwoken). A thread
 *      may also find its page installed before it sleeps, so that no wake-up
 *      reaches it: the install ends it (installed_unwoken).
 *   5. sched_switch with next = the thread: running again (run-queue delay).
 * The result is aggregated in the kernel per thread and per interval epoch;
 * user space flips the epoch, then reads and deletes the old epoch's entries.
 * Nothing is sent to user space per event.
 */

/* ---------------------------------------------------------------- faults */

/* Is tid still in a fault on `page` whose message nobody read yet? */
static __always_inline struct tstate *unread_fault_on(u32 tid, u64 page)
{
    if (!tid)
        return 0;
    struct tstate *t = tstate_of(tid);
    if (t && t->addr == page && !t->read_ts &&
        (t->phase == PH_FAULTED || t->phase == PH_SLEEPING || t->phase == PH_PREEMPTED))
        return t;
    return 0;
}

/* The thread is seen in a new fault (or leaving), still in an earlier one whose
 * message a handler read, with no uffd wake-up or install of its page seen:
 * a signal woke it out of handle_userfault and it faulted again, or the page
 * was installed as a later page of a range (installed_unwoken looks at the
 * first). That fault was a stall, over by now: counted, ending at the last
 * point known inside it, the other wake-up or else its read. */
static __always_inline void end_unwoken(u32 tid, struct tstate *t)
{
    if (!t->read_ts || (t->phase != PH_FAULTED && t->phase != PH_PREEMPTED))
        return;
    dbg_inc(DBG_UNWOKEN_END);
    u64 end = t->wake_ts > t->read_ts ? t->wake_ts : t->read_ts;
    t->phase = PH_WOKEN;
    t->wake_ts = end;
    back_on_cpu(tid, t, end);
}

/* Add tid to the page's faulters, after those still waiting unread (several
 * threads can fault on one page: each queues its own message, oldest read first). */
static __always_inline void note_pending(struct pending_fault *p, u64 page, u32 tid, u32 tgid)
{
    if (p->page == page && p->tgid == tgid) {
#pragma unroll
        for (int i = 0; i < PENDING_TIDS; i++) {
            if (p->tid[i] == tid || !unread_fault_on(p->tid[i], page)) {
                p->tid[i] = tid;
                return;
            }
        }
        return; /* more than PENDING_TIDS at once: the later ones match no read */
    }
    p->page = page;
    p->tgid = tgid;
    p->tid[0] = tid;
#pragma unroll
    for (int i = 1; i < PENDING_TIDS; i++)
        p->tid[i] = 0;
}

/* tid faults on `page`: among that page's faulters (pending_addr). */
static __always_inline void add_faulter(u64 page, u32 tid, u32 tgid)
{
    u32 slot = page_slot(page);
    struct pending_fault *p = pending_addr.lookup(&slot);
    if (p)
        note_pending(p, page, tid, tgid);
}

/* A uffd wake-up (or install) reached the thread now: still on its CPU, its end
 * is decided by what it does next (sched_switch, running_now); off it, it waits
 * for a CPU. */
static __always_inline void uffd_woken(struct tstate *t, int on_cpu, u64 now)
{
    if (on_cpu) {
        t->early_wake_ts = now;
    } else {
        t->wake_ts = now;
        t->phase = PH_WOKEN;
    }
}

static __always_inline int on_page_fault(u64 addr)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (!is_target(tgid))
        return 0;
    if (!uffd_range_hit(tgid, addr)) {
        /* a thread handles one fault at a time: a fault elsewhere means the
         * previous candidate finished without stalling */
        if (!maybe_tracked(tid))
            return 0;
        struct tstate *t = tstate_of(tid);
        if (t) {
            running_now(tid, t);
            end_unwoken(tid, t);
            if (t->phase == PH_FAULTED)
                clear_fault(t);
        }
        return 0;
    }
    struct tstate *t = get_tstate(tid, tgid);
    if (!t)
        return 0;
    u64 page = addr & PAGE_MASK_4K;
    running_now(tid, t);
    end_unwoken(tid, t);
    clear_fault(t);
    t->phase = PH_FAULTED;
    t->fault_ts = bpf_ktime_get_ns();
    t->addr = page;
    add_faulter(page, tid, tgid);
    return 0;
}

TRACEPOINT_PROBE(exceptions, page_fault_user)
{
    return on_page_fault(args->address);
}

TRACEPOINT_PROBE(exceptions, page_fault_kernel)
{
    return on_page_fault(args->address);
}

/* ---------------------------------------------------------------- scheduler */

TRACEPOINT_PROBE(sched, sched_switch)
{
    u32 prev = args->prev_pid, next = args->next_pid;
    u32 cpu = bpf_get_smp_processor_id();
    struct cpu_cur_line *cur = cpu_cur.lookup(&cpu);
    if (cur)
        cur->tid = next;
    /* prev_state: 1 = S, 2 = D (handle_userfault sleeps in either);
     * 0 or TASK_REPORT_MAX = preempted, still runnable */
    if (prev && maybe_tracked(prev)) {
        struct tstate *t = tstate_of(prev);
        u64 now = 0;
        if (t && t->phase == PH_FAULTED && t->early_wake_ts) {
            now = bpf_ktime_get_ns();
            if (now - t->early_wake_ts < EARLY_WAKE_WINDOW_NS) {
                /* the switch-out of the fault a uffd ioctl woke it from while
                 * it was on CPU: the wake-up overtook this tracepoint, or came
                 * before its schedule() and it now waits for a CPU. Either way
                 * it is runnable, and the stall ends when it runs again. */
                dbg_inc(DBG_EARLY_WAKE);
                t->phase = PH_WOKEN;
                t->sleep_ts = t->fault_ts ? t->fault_ts : now;
                t->wake_ts = t->early_wake_ts;
                t->early_wake_ts = 0;
                t = 0; /* done with prev */
            }
        }
        if (t)
            running_now(prev, t);
        if (t && !(args->prev_state & 3)) {
            if (t->phase == PH_FAULTED) {
                t->phase = PH_PREEMPTED;
                t->sleep_ts = now ? now : bpf_ktime_get_ns();
            }
        } else if (t) {
            if (t->phase == PH_FAULTED) {
                t->phase = PH_SLEEPING;
                /* the stall is timed from the fault when it is known (the
                 * clock costs ~80 ns a read on these VMs) */
                t->sleep_ts = t->fault_ts ? t->fault_ts : bpf_ktime_get_ns();
            } else if (t->phase == PH_NONE && t->in_run) {
                /* a vCPU sleeping inside KVM_RUN with no fault event seen
                 * (VMX without kvm_page_fault): only the wake-up can tell */
                t->phase = PH_SLEEPING;
                t->sleep_ts = bpf_ktime_get_ns();
            }
        }
    }
    if (next && maybe_tracked(next)) {
        struct tstate *t = tstate_of(next);
        if (!t)
            return 0;
        t->cpu = cpu + 1;
        if (t->phase == PH_SLEEPING && t->early_wake_ts) {
            /* the uffd wake-up read this thread's CPU before its switch-out
             * was traced there, and its switch-out then read no wake-up: the
             * two ran at once on two CPUs */
            dbg_inc(DBG_EARLY_WAKE);
            t->phase = PH_WOKEN;
            t->wake_ts = t->early_wake_ts;
            back_on_cpu(next, t, bpf_ktime_get_ns());
        } else if (t->phase == PH_SLEEPING) {
            dbg_inc(DBG_MISSED_WAKE);
            clear_fault(t);
        } else {
            back_on_cpu(next, t, bpf_ktime_get_ns());
        }
    }
    return 0;
}

/* A thread in a uffd fault wakes whoever waits to read that uffd (handle_userfault's
 * wake_up_poll). Until one of the thread's messages was matched to a read, such a
 * wakee may be a handler that got the uffd from another process and whose reads we
 * cannot tell from others yet: note it, so its next read of an unknown fd is looked at. */
static __always_inline void maybe_reader(u32 wakee)
{
    u32 waker = (u32)bpf_get_current_pid_tgid();
    if (!maybe_tracked(waker))
        return;
    struct tstate *t = tstate_of(waker);
    if (!t || t->phase != PH_FAULTED || t->reader_known)
        return;
    u32 slot = wakee & (HINT_SLOTS - 1);
    u32 *h = reader_hint.lookup(&slot);
    if (!h || *h == wakee)
        return;
    if (!*h) {
        u32 zero = 0;
        s64 *n = maybe_readers.lookup(&zero);
        if (n)
            __sync_fetch_and_add(n, 1);
    }
    *h = wakee;
}

static __always_inline void reader_seen(u32 tid)
{
    u32 slot = tid & (HINT_SLOTS - 1);
    u32 *h = reader_hint.lookup(&slot);
    if (h && *h == tid) {
        *h = 0;
        u32 zero = 0;
        s64 *n = maybe_readers.lookup(&zero);
        if (n)
            __sync_fetch_and_add(n, -1);
    }
}

TRACEPOINT_PROBE(sched, sched_waking)
{
    u32 wakee = args->pid;
    if (!maybe_tracked(wakee)) {
        maybe_reader(wakee);
        return 0;
    }
    struct tstate *t = tstate_of(wakee);
    if (!t || (t->phase != PH_SLEEPING && t->phase != PH_PREEMPTED && t->phase != PH_FAULTED))
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 waker = (u32)id, waker_tgid = id >> 32;
    struct inflight *io = peek_inflight(waker);
    int by_uffd = io && io->kind == IO_UFFD_RESOLVE;
    /* The wake-up inside a uffd ioctl only reaches faults in its range; a
     * known fault address outside it means another wake-up (e.g. an IRQ
     * that arrived while the handler was in the ioctl). A fault whose message
     * a handler read is inside handle_userfault, which nothing else wakes (a
     * signal comes from its sender's context): its range is not read here,
     * since a user read inside the ioctl costs about twice the one at its
     * exit on these VMs (resolve_range). */
    if (by_uffd && !t->read_ts) {
        resolve_range(io);
        if (t->addr && io->len && !(t->addr + 4096 > io->start && t->addr < io->start + io->len))
            by_uffd = 0;
    }
    if (!by_uffd && t->read_ts)
        t->wake_ts = bpf_ktime_get_ns(); /* it leaves handle_userfault (a signal), or waits again there */
    int on_cpu = 0;
    if (t->phase == PH_FAULTED) {
        if (!by_uffd)
            return 0;
        /* We think it is on CPU. If its CPU switched to another thread since,
         * it left in a switch we did not see: it did stall. Otherwise it is
         * still in handle_userfault, before or inside its schedule(): it
         * waited for this wake-up all the same (a uffd wake-up reaches only
         * threads queued on the uffd), so it is a stall either way. Its end
         * is decided by what the thread does next (sched_switch, running_now). */
        u32 c = t->cpu - 1;
        struct cpu_cur_line *cur = t->cpu ? cpu_cur.lookup(&c) : 0;
        if (!cur || cur->tid == wakee) {
            dbg_inc(DBG_WOKEN_ON_CPU);
            on_cpu = 1;
        } else {
            dbg_inc(DBG_LOST_SWITCH_OUT);
            t->sleep_ts = t->fault_ts;
        }
    }
    if (!by_uffd) {
        dbg_inc(DBG_NOT_UFFD_WAKE);
        if (t->addr) {
            t->phase = PH_FAULTED; /* e.g. a lock wait before handle_userfault */
            t->sleep_ts = 0;
        } else {
            clear_fault(t);
        }
        return 0;
    }
    uffd_woken(t, on_cpu, bpf_ktime_get_ns());
    if (!t->read_ts && !t->addr && io->read_ts) { /* (the range was read above) */
        t->read_ts = io->read_ts;
        dbg_inc(DBG_READ_VIA_COPY);
    }
    /* a separate handler process (Firecracker-style) becomes visible, and
     * which process it serves */
    if (waker_tgid != t->tgid) {
        if (!io->followed && !is_target(waker_tgid)) {
            adopt(waker_tgid, TARGET_HANDLER, 1);
            io->followed = 1;
        }
        struct fd_key k = {.tgid = waker_tgid, .fd = io->fd};
        u32 *to = serves.lookup(&k);
        if (!to || *to != t->tgid) {
            u32 v = t->tgid;
            serves.update(&k, &v);
        }
    }
    return 0;
}

/* A resolving ioctl that woke its range has installed its first page. A thread
 * still in a fault on that page whose message a handler read, and whom no
 * wake-up reached, queued its message and then found the page installed before
 * it slept: handle_userfault checks the page table after queueing, and the
 * install came in between, so it never slept and the wake-up found it running.
 * It waited for the handler all the same; its stall ends now, as one woken on
 * its CPU (a preempted one when it runs again). Later pages of a range are left
 * to end_unwoken. */
static __always_inline void installed_unwoken(struct inflight *io)
{
    u64 page = io->start & PAGE_MASK_4K;
    u32 slot = page_slot(page);
    struct pending_fault *p = pending_addr.lookup(&slot);
    if (!p || p->page != page)
        return;
    u64 now = 0;
    int ours = p->tgid == io->tgid; /* else asked once, when there is a candidate */
#pragma unroll
    for (int i = 0; i < PENDING_TIDS; i++) {
        u32 tid = p->tid[i];
        struct tstate *t = tid ? tstate_of(tid) : 0;
        if (!t || t->addr != page || !t->read_ts || t->early_wake_ts)
            continue;
        if (t->phase != PH_FAULTED && t->phase != PH_PREEMPTED)
            continue;
        if (!ours) {
            /* the same address in another process: only the one this uffd serves */
            struct fd_key k = {.tgid = io->tgid, .fd = io->fd};
            u32 *to = serves.lookup(&k);
            if (!to || *to != p->tgid)
                return;
            ours = 1;
        }
        if (!now)
            now = bpf_ktime_get_ns();
        dbg_inc(DBG_INSTALLED_UNWOKEN);
        uffd_woken(t, t->phase == PH_FAULTED, now);
    }
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u32 tid = args->pid;
    if (maybe_tracked(tid)) {
        struct tstate *t = tstate_of(tid);
        if (t) {
            running_now(tid, t); /* a stall it was woken from ends before it does */
            end_unwoken(tid, t);
        }
        drop_tstate(tid);
    }
    struct inflight io;
    take_inflight(tid, &io);
    return 0;
}
