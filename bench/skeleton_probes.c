/* A lower bound for #17, not a tracer: the least work any design must do on
 * the tracepoints pctop attaches to time one engine fault (bench/probe_cost.py
 * --skeleton loads it). Per hit: one array slot by tid (or tgid, fd, page) to
 * tell whether the event matters. Per fault: the four clock reads (start,
 * message read, wake-up, running again), the user reads of the message and of
 * the resolving ioctl's struct (its length: what it installed), the stall's
 * statistics in the thread's slot, and the uffd's install counters.
 *
 * Left out, as what the real probes add on top of this: ranges kept per
 * registration, several faulters per page, lost-switch and early-wake
 * recovery, per-interval statistics (its sums only grow), read counts and the
 * page map, separate handler processes, vCPU indices, KVM_RUN exits,
 * fork/close/dup of uffds, spill-over maps for colliding slots. It counts its
 * stalls (`done`) so the benchmark can check that it did follow every fault.
 *
 * bench/toggle.py SkeletonProbes puts probes/pctop_defs.h before it: the
 * constants and the uffd_msg layout are the probes' own. */
#define SLOTS 65536
#define ARRAY(name, type, n) BPF_F_TABLE("array", int, type, name, n, BPF_F_MMAPABLE)

struct thread {             /* 256 bytes: state, then statistics */
    u64 owner;
    u64 fault_ts, read_ts, wake_ts;
    u32 tgid, phase;
    u64 pad0[3];
    u64 faults, stall_ns, queued_ns, service_ns, runq_ns, max_ns, pad1[2];
    u32 hist[HIST_BUCKETS];
    u64 pad2[4];
};
struct io {
    u64 owner;
    u64 arg;
    u32 kind;
    s32 fd;
    u64 pad[5];
};
struct sk_range {
    u64 tgid, start, end, pad;
};
struct page_tid {
    u64 page;
    u64 tid; /* or, for a message no thread was found for, its read time */
};

ARRAY(threads, struct thread, SLOTS);
ARRAY(ios, struct io, SLOTS);
BPF_ARRAY(targets, u64, SLOTS);     /* tgid slot -> tgid */
BPF_ARRAY(ranges, struct sk_range, SLOTS);
BPF_ARRAY(uffds, u64, SLOTS);       /* (tgid, fd) slot -> tgid << 32 | fd */
BPF_ARRAY(pending, struct page_tid, SLOTS);
BPF_ARRAY(read_pages, struct page_tid, SLOTS);
BPF_PERCPU_ARRAY(done, u64, 2);     /* 0: stalls counted, 1: installs */
struct installs {
    u64 copies, bytes, pages, pad;
};
BPF_PERCPU_ARRAY(uffd_installs, struct installs, SLOTS); /* by (tgid, fd) slot */

static __always_inline u32 slot(u64 x) { return x & (SLOTS - 1); }
static __always_inline u32 page_slot(u64 page) { return (page >> 12) & (SLOTS - 1); }

static __always_inline int followed(u32 tgid)
{
    u32 k = slot(tgid);
    u64 *t = targets.lookup(&k);
    return t && *t == tgid;
}

static __always_inline struct thread *thread_of(u32 tid)
{
    u32 k = slot(tid);
    struct thread *t = threads.lookup(&k);
    return t && t->owner == tid ? t : 0;
}

static __always_inline struct thread *claim(u32 tid, u32 tgid)
{
    u32 k = slot(tid);
    struct thread *t = threads.lookup(&k);
    if (!t)
        return 0;
    if (t->owner != tid) {
        if (__sync_val_compare_and_swap(&t->owner, 0, (u64)tid) != 0)
            return 0;
        t->tgid = tgid;
        t->phase = PH_NONE;
    }
    return t;
}

/* hist_bucket(), taken from probes/pctop_state.c by bench/toggle.py SkeletonProbes */
HIST_BUCKET_FN

static __always_inline void count(u32 which, u64 n)
{
    u64 *c = done.lookup(&which);
    if (c)
        *c += n;
}

static __always_inline void fault_start(u64 page)
{
    u64 id = bpf_get_current_pid_tgid();
    struct thread *t = claim((u32)id, id >> 32);
    if (!t)
        return;
    t->phase = PH_FAULTED;
    t->fault_ts = bpf_ktime_get_ns();
    t->read_ts = 0;
    if (page) {
        u32 k = page_slot(page);
        struct page_tid *p = pending.lookup(&k);
        if (p) {
            p->page = page;
            p->tid = (u32)id;
        }
    }
}

static __always_inline int on_page_fault(u64 addr)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!followed(tgid))
        return 0;
    u32 k = slot(tgid);
    struct sk_range *r = ranges.lookup(&k);
    if (r && r->tgid == tgid && addr >= r->start && addr < r->end)
        fault_start(addr & PAGE_MASK_4K);
    return 0;
}

TRACEPOINT_PROBE(exceptions, page_fault_user) { return on_page_fault(args->address); }
TRACEPOINT_PROBE(exceptions, page_fault_kernel) { return on_page_fault(args->address); }

TRACEPOINT_PROBE(kvmmmu, kvm_mmu_pagetable_walk)
{
    if (followed(bpf_get_current_pid_tgid() >> 32))
        fault_start(0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    struct thread *t = thread_of(args->prev_pid);
    if (t && t->phase == PH_FAULTED && (args->prev_state & 3))
        t->phase = PH_SLEEPING;
    t = thread_of(args->next_pid);
    if (!t || t->phase != PH_WOKEN)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 stall = now - t->fault_ts;
    u64 rd = t->read_ts ? t->read_ts : t->fault_ts;
    t->faults += 1;
    t->stall_ns += stall;
    t->queued_ns += rd - t->fault_ts;
    t->service_ns += t->wake_ts - rd;
    t->runq_ns += now - t->wake_ts;
    if (stall > t->max_ns)
        t->max_ns = stall;
    u32 b = hist_bucket(stall);
    if (b < HIST_BUCKETS)
        t->hist[b] += 1;
    t->phase = PH_NONE;
    count(0, 1);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_waking)
{
    struct thread *t = thread_of(args->pid);
    if (!t || (t->phase != PH_SLEEPING && t->phase != PH_FAULTED))
        return 0;
    u32 waker = (u32)bpf_get_current_pid_tgid();
    u32 k = slot(waker);
    struct io *io = ios.lookup(&k);
    if (!io || io->owner != waker || io->kind != IO_UFFD_RESOLVE)
        return 0;
    if (!t->read_ts) { /* a message matched by no thread: by the ioctl's first page */
        u64 dst = 0;
        bpf_probe_read_user(&dst, sizeof(dst), (void *)io->arg);
        u64 page = dst & PAGE_MASK_4K;
        u32 pk = page_slot(page);
        struct page_tid *p = read_pages.lookup(&pk);
        if (p && p->page == page)
            t->read_ts = p->tid;
    }
    t->wake_ts = bpf_ktime_get_ns();
    t->phase = PH_WOKEN;
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
    u32 cmd = (u32)args->cmd;
    if (((cmd >> 8) & 0xff) != IOC_TYPE_UFFD)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    u32 k = slot(tgid);
    u64 *tg = targets.lookup(&k);
    if (tg)
        *tg = tgid; /* follow every uffd user */
    u64 key = ((u64)tgid << 32) | (u32)args->fd;
    u32 uk = slot((tgid << 6) + (u32)args->fd);
    u64 *u = uffds.lookup(&uk);
    if (u)
        *u = key;
    u32 nr = cmd & 0xff;
    u32 kind = cmd == UFFDIO_REGISTER ? IO_UFFD_REGISTER
             : nr >= UFFDIO_NR_WAKE && nr <= UFFDIO_NR_POISON ? IO_UFFD_RESOLVE : 0;
    if (!kind)
        return 0;
    u32 ik = slot(tid);
    struct io *io = ios.lookup(&ik);
    if (io) {
        io->owner = tid;
        io->kind = kind;
        io->fd = args->fd;
        io->arg = args->arg;
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 k = slot((u32)id);
    struct io *io = ios.lookup(&k);
    if (!io || io->owner != (u32)id)
        return 0;
    io->owner = 0;
    if (io->kind == IO_UFFD_REGISTER && args->ret == 0) {
        u64 r[2] = {};
        bpf_probe_read_user(r, sizeof(r), (void *)io->arg);
        u32 tk = slot(id >> 32);
        struct sk_range *rg = ranges.lookup(&tk);
        if (rg) {
            rg->tgid = id >> 32;
            rg->start = r[0];
            rg->end = r[0] + r[1];
        }
    } else if (io->kind == IO_UFFD_RESOLVE) {
        u64 r[3] = {}; /* dst, src, len of a uffdio_copy */
        bpf_probe_read_user(r, sizeof(r), (void *)io->arg);
        u32 uk = slot(((id >> 32) << 6) + (u32)io->fd);
        struct installs *in = uffd_installs.lookup(&uk);
        if (in && args->ret == 0) {
            in->copies += 1;
            in->bytes += r[2];
            in->pages += r[2] >> 12;
        }
        count(1, 1);
    }
    return 0;
}

static __always_inline void match(u64 now, u64 addr, u32 ptid)
{
    struct thread *t = ptid ? thread_of(ptid) : 0;
    u64 page = addr & PAGE_MASK_4K;
    u32 pk = page_slot(page);
    if (!t) {
        struct page_tid *p = pending.lookup(&pk);
        if (p && p->page == page)
            t = thread_of((u32)p->tid);
    }
    if (t) {
        t->read_ts = now;
        return;
    }
    struct page_tid *rp = read_pages.lookup(&pk);
    if (rp) {
        rp->page = page;
        rp->tid = now;
    }
}

TRACEPOINT_PROBE(syscalls, sys_exit_read)
{
    long ret = args->ret;
    if (ret < UFFD_MSG_SIZE)
        return 0;
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    s32 fd = regs->di;
    u32 uk = slot((tgid << 6) + (u32)fd);
    u64 *u = uffds.lookup(&uk);
    if (!u || *u != (((u64)tgid << 32) | (u32)fd))
        return 0;
    u64 buf = regs->si, now = bpf_ktime_get_ns();
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if ((i + 1) * UFFD_MSG_SIZE > ret)
            break;
        struct uffd_msg_head m = {};
        if (bpf_probe_read_user(&m, sizeof(m), (void *)(buf + i * UFFD_MSG_SIZE)))
            break;
        if (m.event == UFFD_EVENT_PAGEFAULT)
            match(now, m.address, m.ptid);
    }
    return 0;
}
