/* pctop probes: post-copy (userfaultfd) stalls and KVM_RUN exits, from
 * tracepoints only (no kprobes/fentry, which many kernels lack).
 *
 * Compiled by bcc at run time (pctop/sources/ebpf.py). Optional tracepoints
 * are guarded by HAVE_* macros that the loader defines when tracefs has them.
 *
 * The life of one fault, as reconstructed here (design.md):
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
 *      Any other wake-up (signal, I/O, IRQ) means the sleep was not ours.
 *   5. sched_switch with next = the thread: running again (run-queue delay).
 * The result is aggregated in the kernel per thread and per interval epoch;
 * user space flips the epoch, then reads and deletes the old epoch's entries.
 * Nothing is sent to user space per event.
 */
#include <uapi/linux/ptrace.h>

#define HIST_BUCKETS 24
#define MAX_RANGES 64 /* registered ranges tracked per process; more => every fault is a candidate */
#define MAX_MSGS 32   /* uffd_msg records matched per read() (tail-call chain); msgs_read is always exact */
#define PAGE_MASK_4K (~0xfffULL)
#define UFFD_MSG_SIZE 32
#define UFFD_EVENT_PAGEFAULT 0x12

/* ioctl numbers (x86-64 encodings; the type byte is (cmd >> 8) & 0xff). */
#define IOC_TYPE_UFFD 0xAA
#define IOC_TYPE_KVM 0xAE
#define USERFAULTFD_IOC_NEW 0xaa00
#define UFFDIO_REGISTER 0xc020aa00
#define UFFDIO_UNREGISTER 0x8010aa01
#define UFFDIO_NR_WAKE 0x02
#define UFFDIO_NR_COPY 0x03
#define UFFDIO_NR_ZEROPAGE 0x04
#define UFFDIO_NR_MOVE 0x05
#define UFFDIO_NR_WRITEPROTECT 0x06
#define UFFDIO_NR_CONTINUE 0x07
#define UFFDIO_NR_POISON 0x08
#define KVM_CREATE_VCPU 0xae41
#define KVM_RUN 0xae80
#define KVM_EXIT_UNKNOWN 0
#define KVM_EXIT_MEMORY_FAULT 39
#define ERR_EFAULT 14
#define ERR_EEXIST 17

/* config array slots, written by user space */
#define CFG_FOLLOW_ALL 0
#define CFG_EPOCH 1

/* targets map flags */
#define TARGET_GIVEN 1    /* pid given by the user */
#define TARGET_AUTO 2     /* follow_all: it called userfaultfd()/a uffd or KVM ioctl */
#define TARGET_HANDLER 4  /* it resolved a fault of a followed thread (e.g. a separate uffd handler) */

/* per-thread fault phase */
#define PH_NONE 0
#define PH_FAULTED 1  /* candidate fault seen, thread still running */
#define PH_SLEEPING 2 /* it went to sleep after the candidate */
#define PH_WOKEN 3    /* a uffd ioctl woke it; waiting for a CPU */

/* inflight ioctl kinds */
#define IO_UFFD_RESOLVE 1
#define IO_UFFD_REGISTER 2
#define IO_UFFD_UNREGISTER 3
#define IO_UFFD_NEW 4
#define IO_KVM_CREATE_VCPU 5

/* how a vCPU fd's index was learned */
#define HOW_CREATE_VCPU 1 /* saw KVM_CREATE_VCPU return this fd */
#define HOW_VCPU_FD 2     /* seeded by user space from /proc/<pid>/fd (anon_inode:kvm-vcpu:N) */

/* debug counters (dbg array), reported by EbpfSource.debug_counters() */
#define DBG_NOT_UFFD_WAKE 0   /* a candidate's sleep ended by something else than a uffd ioctl */
#define DBG_MISSED_WAKE 1     /* switched in while still "sleeping": wake-up not seen */
#define DBG_MSG_UNMATCHED 2   /* a page-fault message matched no tracked thread */
#define DBG_MSG_BY_PTID 3
#define DBG_MSG_BY_ADDR 4
#define DBG_READ_VIA_COPY 5   /* read matched to a weak fault through the COPY's first page */
#define DBG_EXIT_STALLS 6     /* vCPU-exit mode stalls (EFAULT return -> KVM_RUN again) */
#define DBG_SLOTS 8

struct uffd_range {
    u64 start, end;
};

struct range_set {
    u32 n;        /* slots in use (may contain holes start == end) */
    u32 overflow; /* more than MAX_RANGES registrations: match everything */
    struct uffd_range r[MAX_RANGES];
};

struct fd_key {
    u32 tgid;
    s32 fd;
};

struct vcpu_fd_val {
    s32 vcpu;
    u32 how;
};

struct vcpu_info {
    u32 tgid;
    s32 vcpu;
    u32 how;
};

struct tstate {
    u64 fault_ts;  /* candidate fault start, 0 = only the sleep is known */
    u64 addr;      /* page of the faulting host address, 0 = unknown (weak) */
    u64 sleep_ts;
    u64 read_ts;   /* when a handler read its message, 0 = not (yet) read */
    u64 wake_ts;
    u64 efault_ts; /* KVM_RUN returned EFAULT (vCPU-exit mode), waiting for re-entry */
    u32 tgid;
    s32 vcpu;      /* -1 unknown */
    u8 phase;
    u8 in_run;     /* inside KVM_RUN (a sleep there may be a GUP-path uffd fault) */
    u8 pad[6];
};

struct pending_fault {
    u32 tid;
    u32 tgid;
};

struct inflight {
    u64 start;   /* range of a uffd ioctl (user address) */
    u64 len;
    u64 arg;
    u64 read_ts; /* read time of a message for the first page of the range (weak matching) */
    u32 cmd;
    s32 fd;
    u32 kind;
    u32 tgid;
};

struct read_stash {
    u64 buf;
    s32 fd;
    u32 tgid;
};

struct tkey {
    u32 tid;
    u32 epoch;
};

struct tstats {
    u32 tgid;
    u32 pad;
    u64 faults;
    u64 stall_ns;
    u64 queued_ns;
    u64 service_ns;
    u64 runq_ns;
    u64 faults_no_read;
    u64 max_ns;
    u64 memory_fault_exits;
    u64 hist[HIST_BUCKETS];
};

struct exit_key {
    u32 tid;
    u32 tgid;
    u32 epoch;
    u32 code; /* errno << 16 | exit_reason */
};

struct uf_key {
    u32 tgid;
    s32 fd;
    u32 epoch;
    u32 pad;
};

struct uf_stats {
    u64 msgs_read;
    u64 read_calls;
    u64 copies;
    u64 zeropages;
    u64 continues;
    u64 wakes;
    u64 pages_installed;
    u64 bytes_installed;
    u64 eexist;
};

struct uffd_msg_head {
    u8 event;
    u8 reserved1;
    u16 reserved2;
    u32 reserved3;
    u64 flags;
    u64 address;
    u32 ptid;
    u32 pad;
};

BPF_ARRAY(config, u64, 2);
BPF_ARRAY(dbg, u64, DBG_SLOTS);
BPF_HASH(targets, u32, u32, 4096);
BPF_HASH(ranges, u32, struct range_set, 1024);
BPF_PERCPU_ARRAY(range_zero, struct range_set, 1);
BPF_HASH(uffd_fds, struct fd_key, u32, 16384);
BPF_HASH(vcpu_fds, struct fd_key, struct vcpu_fd_val, 16384);
BPF_HASH(vcpus, u32, struct vcpu_info, 16384);
BPF_HASH(tstate, u32, struct tstate, 65536);
BPF_TABLE("lru_hash", u64, struct pending_fault, pending_addr, 65536);
BPF_TABLE("lru_hash", u64, u64, read_pages, 16384);
BPF_HASH(inflight, u32, struct inflight, 16384);
BPF_HASH(readstash, u32, struct read_stash, 16384);
BPF_HASH(stats, struct tkey, struct tstats, 65536);
BPF_PERCPU_ARRAY(stats_zero, struct tstats, 1);
BPF_HASH(exits, struct exit_key, u64, 65536);
BPF_HASH(ufstats, struct uf_key, struct uf_stats, 16384);

/* The per-thread maps (tstate, inflight, readstash) are consulted on events
 * that fire for every thread of the host: each context switch, wake-up, ioctl
 * and read() exit. A count of their entries per tid slot, in an array (lookup
 * inlined, no hashing), lets the common untracked case skip the hash lookups.
 * Every successful insert adds one, every successful delete takes one away;
 * all of them happen in the thread's own context, so they never race. */
#define HINT_SLOTS 65536
BPF_ARRAY(tid_hint, u32, HINT_SLOTS);

static __always_inline int maybe_tracked(u32 tid)
{
    u32 slot = tid & (HINT_SLOTS - 1);
    u32 *c = tid_hint.lookup(&slot);
    return c && *c;
}

static __always_inline void hint_add(u32 tid, u32 delta)
{
    u32 slot = tid & (HINT_SLOTS - 1);
    u32 *c = tid_hint.lookup(&slot);
    if (c)
        __sync_fetch_and_add(c, delta);
}

/* Processes that ever held a known uffd, by tgid slot: read() is the most
 * frequent syscall on a host and only reads of a uffd matter. Set, never
 * cleared (a stale slot only costs the hash lookup it would have cost anyway). */
BPF_ARRAY(uffd_tgid_hint, u32, HINT_SLOTS);

#define HINT_INC 1u
#define HINT_DEC ((u32)-1)

static __always_inline u64 cfg(u32 slot)
{
    u64 *v = config.lookup(&slot);
    return v ? *v : 0;
}

static __always_inline void dbg_inc(u32 slot)
{
    u64 *v = dbg.lookup(&slot);
    if (v)
        __sync_fetch_and_add(v, 1);
}

/* floor(log2(us)), bucket 0 also takes < 2 us; clamped to the last bucket. */
static __always_inline u32 hist_bucket(u64 ns)
{
    u64 v = ns / 1000;
    u32 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8) { v >>= 8; r += 8; }
    if (v >> 4) { v >>= 4; r += 4; }
    if (v >> 2) { v >>= 2; r += 2; }
    if (v >> 1) { r += 1; }
    return r < HIST_BUCKETS ? r : HIST_BUCKETS - 1;
}

/* Is this process followed? In follow_all mode, `adopt` adds it (the caller
 * saw it use userfaultfd or KVM, so none of its later faults is missed). */
static __always_inline int followed(u32 tgid, int adopt)
{
    if (targets.lookup(&tgid))
        return 1;
    if (adopt && cfg(CFG_FOLLOW_ALL)) {
        u32 flag = TARGET_AUTO;
        targets.update(&tgid, &flag);
        return 1;
    }
    return 0;
}

static __always_inline struct tstate *get_tstate(u32 tid, u32 tgid)
{
    struct tstate *t = tstate.lookup(&tid);
    if (t)
        return t;
    struct tstate z = {};
    z.tgid = tgid;
    z.vcpu = -1;
    if (tstate.insert(&tid, &z) == 0)
        hint_add(tid, HINT_INC);
    return tstate.lookup(&tid);
}

static __always_inline struct tstats *get_stats(u32 tid, u32 tgid)
{
    struct tkey k = {.tid = tid, .epoch = (u32)cfg(CFG_EPOCH)};
    struct tstats *s = stats.lookup(&k);
    if (s)
        return s;
    u32 zero = 0;
    struct tstats *z = stats_zero.lookup(&zero);
    if (!z)
        return 0;
    stats.insert(&k, z);
    s = stats.lookup(&k);
    if (s)
        s->tgid = tgid;
    return s;
}

static __always_inline void account_stall(struct tstats *s, u64 stall)
{
    __sync_fetch_and_add(&s->faults, 1);
    __sync_fetch_and_add(&s->stall_ns, stall);
    if (stall > s->max_ns)
        s->max_ns = stall; /* racy max: only this thread's events update it */
    u32 b = hist_bucket(stall);
    if (b < HIST_BUCKETS)
        __sync_fetch_and_add(&s->hist[b], 1);
}

static __always_inline void clear_fault(struct tstate *t)
{
    t->phase = PH_NONE;
    t->fault_ts = 0;
    t->addr = 0;
    t->sleep_ts = 0;
    t->read_ts = 0;
    t->wake_ts = 0;
}

/* ---------------------------------------------------------------- ranges */

static __always_inline int uffd_range_hit(u32 tgid, u64 addr)
{
    struct range_set *rs = ranges.lookup(&tgid);
    if (!rs)
        return 0;
    if (rs->overflow)
        return 1;
    u32 n = rs->n;
    /* indices masked and unrolling off: keeps the verifier's bounds simple */
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < MAX_RANGES; i++) {
        if (i >= n)
            break;
        if (addr >= rs->r[i & (MAX_RANGES - 1)].start && addr < rs->r[i & (MAX_RANGES - 1)].end)
            return 1;
    }
    return 0;
}

static __always_inline void uffd_range_add(u32 tgid, u64 start, u64 len)
{
    struct range_set *rs = ranges.lookup(&tgid);
    if (!rs) {
        u32 zero = 0;
        struct range_set *z = range_zero.lookup(&zero);
        if (!z)
            return;
        ranges.insert(&tgid, z);
        rs = ranges.lookup(&tgid);
        if (!rs)
            return;
    }
    u32 n = rs->n;
    /* reuse a hole left by UFFDIO_UNREGISTER first */
    /* indices masked and unrolling off: keeps the verifier's bounds simple */
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < MAX_RANGES; i++) {
        if (i >= n)
            break;
        if (rs->r[i & (MAX_RANGES - 1)].start == rs->r[i & (MAX_RANGES - 1)].end) {
            rs->r[i & (MAX_RANGES - 1)].start = start;
            rs->r[i & (MAX_RANGES - 1)].end = start + len;
            return;
        }
    }
    if (n >= MAX_RANGES) {
        rs->overflow = 1;
        return;
    }
    rs->r[n & (MAX_RANGES - 1)].start = start;
    rs->r[n & (MAX_RANGES - 1)].end = start + len;
    rs->n = n + 1;
}

static __always_inline void uffd_range_remove(u32 tgid, u64 start, u64 len)
{
    struct range_set *rs = ranges.lookup(&tgid);
    if (!rs)
        return;
    u32 n = rs->n;
    /* indices masked and unrolling off: keeps the verifier's bounds simple */
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < MAX_RANGES; i++) {
        if (i >= n)
            break;
        /* only whole registrations inside the unregistered span go; a partial
         * unregister keeps the range (a stale range only makes candidates,
         * which still need a uffd wake-up to count) */
        if (rs->r[i & (MAX_RANGES - 1)].start >= start && rs->r[i & (MAX_RANGES - 1)].end <= start + len)
            rs->r[i & (MAX_RANGES - 1)].start = rs->r[i & (MAX_RANGES - 1)].end = 0;
    }
}

/* ---------------------------------------------------------------- faults */

static __always_inline int on_page_fault(u64 addr)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (!targets.lookup(&tgid))
        return 0;
    if (!uffd_range_hit(tgid, addr)) {
        /* a thread handles one fault at a time: a fault elsewhere means the
         * previous candidate finished without stalling */
        if (!maybe_tracked(tid))
            return 0;
        struct tstate *t = tstate.lookup(&tid);
        if (t && t->phase == PH_FAULTED)
            clear_fault(t);
        return 0;
    }
    struct tstate *t = get_tstate(tid, tgid);
    if (!t)
        return 0;
    u64 page = addr & PAGE_MASK_4K;
    clear_fault(t);
    t->phase = PH_FAULTED;
    t->fault_ts = bpf_ktime_get_ns();
    t->addr = page;
    struct pending_fault p = {.tid = tid, .tgid = tgid};
    pending_addr.update(&page, &p);
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

/* A vCPU fault that reaches the uffd through get_user_pages raises no
 * exception; KVM's own fault events give a weak (address-less) start. */
static __always_inline int on_kvm_fault(void)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct tstate *t = tstate.lookup(&tid);
    if (!t) {
        if (!targets.lookup(&tgid))
            return 0;
        t = get_tstate(tid, tgid);
        if (!t)
            return 0;
    }
    t->in_run = 1; /* these fire only inside KVM_RUN */
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

/* ---------------------------------------------------------------- scheduler */

TRACEPOINT_PROBE(sched, sched_switch)
{
    u32 prev = args->prev_pid, next = args->next_pid;
    /* prev_state: 1 = S, 2 = D (handle_userfault sleeps in either);
     * 0 or TASK_REPORT_MAX = preempted, still runnable */
    if (prev && (args->prev_state & 3) && maybe_tracked(prev)) {
        struct tstate *t = tstate.lookup(&prev);
        if (t) {
            if (t->phase == PH_FAULTED) {
                t->phase = PH_SLEEPING;
                t->sleep_ts = bpf_ktime_get_ns();
            } else if (t->phase == PH_NONE && t->in_run) {
                /* a vCPU sleeping inside KVM_RUN with no fault event seen
                 * (VMX without kvm_page_fault): only the wake-up can tell */
                t->phase = PH_SLEEPING;
                t->sleep_ts = bpf_ktime_get_ns();
            }
        }
    }
    if (next && maybe_tracked(next)) {
        struct tstate *t = tstate.lookup(&next);
        if (!t)
            return 0;
        if (t->phase == PH_WOKEN) {
            u64 now = bpf_ktime_get_ns();
            u64 start = t->fault_ts ? t->fault_ts : t->sleep_ts;
            u64 stall = now > start ? now - start : 0;
            u64 runq = now > t->wake_ts ? now - t->wake_ts : 0;
            struct tstats *s = get_stats(next, t->tgid);
            if (s) {
                account_stall(s, stall);
                __sync_fetch_and_add(&s->runq_ns, runq);
                if (t->read_ts) {
                    u64 rd = t->read_ts > start ? t->read_ts : start;
                    __sync_fetch_and_add(&s->queued_ns, rd - start);
                    if (t->wake_ts > rd)
                        __sync_fetch_and_add(&s->service_ns, t->wake_ts - rd);
                } else {
                    __sync_fetch_and_add(&s->faults_no_read, 1);
                }
            }
            clear_fault(t);
        } else if (t->phase == PH_SLEEPING) {
            dbg_inc(DBG_MISSED_WAKE);
            clear_fault(t);
        }
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_waking)
{
    u32 wakee = args->pid;
    if (!maybe_tracked(wakee))
        return 0;
    struct tstate *t = tstate.lookup(&wakee);
    if (!t || t->phase != PH_SLEEPING)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 waker = (u32)id, waker_tgid = id >> 32;
    struct inflight *io = inflight.lookup(&waker);
    int by_uffd = io && io->kind == IO_UFFD_RESOLVE;
    /* the wake-up inside a uffd ioctl only reaches faults in its range; a
     * known fault address outside it means another wake-up (e.g. an IRQ
     * that arrived while the handler was in the ioctl) */
    if (by_uffd && t->addr && io->len &&
        !(t->addr + 4096 > io->start && t->addr < io->start + io->len))
        by_uffd = 0;
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
    t->wake_ts = bpf_ktime_get_ns();
    t->phase = PH_WOKEN;
    if (!t->read_ts && !t->addr && io->read_ts) {
        t->read_ts = io->read_ts;
        dbg_inc(DBG_READ_VIA_COPY);
    }
    /* a separate handler process (Firecracker-style) becomes visible */
    if (!targets.lookup(&waker_tgid)) {
        u32 flag = TARGET_HANDLER;
        targets.update(&waker_tgid, &flag);
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u32 tid = args->pid;
    if (!maybe_tracked(tid))
        return 0;
    if (tstate.delete(&tid) == 0)
        hint_add(tid, HINT_DEC);
    if (inflight.delete(&tid) == 0)
        hint_add(tid, HINT_DEC);
    if (readstash.delete(&tid) == 0)
        hint_add(tid, HINT_DEC);
    return 0;
}

/* ---------------------------------------------------------------- uffd handler side */

static __always_inline struct uf_stats *get_ufstats(u32 tgid, s32 fd)
{
    struct uf_key k = {.tgid = tgid, .fd = fd, .epoch = (u32)cfg(CFG_EPOCH)};
    struct uf_stats *s = ufstats.lookup(&k);
    if (s)
        return s;
    struct uf_stats z = {};
    ufstats.insert(&k, &z);
    return ufstats.lookup(&k);
}

static __always_inline void remember_uffd(u32 tgid, s32 fd)
{
    struct fd_key k = {.tgid = tgid, .fd = fd};
    if (!uffd_fds.lookup(&k)) {
        u32 one = 1;
        uffd_fds.update(&k, &one);
        u32 slot = tgid & (HINT_SLOTS - 1);
        u32 *h = uffd_tgid_hint.lookup(&slot);
        if (h)
            *h = 1;
    }
}

TRACEPOINT_PROBE(syscalls, sys_exit_userfaultfd)
{
    if (args->ret < 0)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    followed(tgid, 1);
    remember_uffd(tgid, (s32)args->ret);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 slot = (id >> 32) & (HINT_SLOTS - 1);
    u32 *h = uffd_tgid_hint.lookup(&slot);
    if (!h || !*h)
        return 0;
    struct fd_key k = {.tgid = id >> 32, .fd = (s32)args->fd};
    if (!uffd_fds.lookup(&k))
        return 0;
    u32 tid = (u32)id;
    struct read_stash rs = {.buf = (u64)args->buf, .fd = k.fd, .tgid = k.tgid};
    if (readstash.insert(&tid, &rs) == 0)
        hint_add(tid, HINT_INC);
    else
        readstash.update(&tid, &rs);
    return 0;
}

/* One page-fault message: find the thread it names and note the read. */
static __always_inline void match_msg(u64 now, u64 addr, u32 ptid)
{
    u64 page = addr & PAGE_MASK_4K;
    if (ptid) {
        u32 key = ptid;
        struct tstate *t = tstate.lookup(&key);
        if (t && t->phase != PH_WOKEN && (t->phase != PH_NONE || t->in_run)) {
            if (t->phase == PH_NONE) {
                /* read before any fault event (weak path): start from now */
                t->phase = PH_FAULTED;
                t->fault_ts = now;
            }
            if (!t->read_ts)
                t->read_ts = now;
            dbg_inc(DBG_MSG_BY_PTID);
            return;
        }
    }
    struct pending_fault *p = pending_addr.lookup(&page);
    if (p) {
        u32 tid = p->tid;
        struct tstate *t = tstate.lookup(&tid);
        if (t && t->addr == page && (t->phase == PH_FAULTED || t->phase == PH_SLEEPING)) {
            if (!t->read_ts)
                t->read_ts = now;
            dbg_inc(DBG_MSG_BY_ADDR);
            return;
        }
    }
    /* no thread known for it (weak vCPU fault without THREAD_ID): keep the
     * read time for the COPY that will resolve this page */
    read_pages.update(&page, &now);
    dbg_inc(DBG_MSG_UNMATCHED);
}

/* Messages of one read() are matched by a program that tail-calls itself,
 * one message per call: an open-coded loop over match_msg's branches is
 * beyond the verifier after a couple of messages, and bcc 0.26 cannot load
 * bpf_loop callbacks. The tail-call chain limit (33) bounds MAX_MSGS. */
struct msg_cursor {
    u64 buf;
    u64 now;
    u32 i;
    u32 n;
};
BPF_PERCPU_ARRAY(msg_cursor, struct msg_cursor, 1);
BPF_PROG_ARRAY(msg_parser, 1);

int parse_uffd_msgs(void *ctx)
{
    u32 zero = 0;
    struct msg_cursor *c = msg_cursor.lookup(&zero);
    if (!c || c->i >= c->n)
        return 0;
    struct uffd_msg_head m = {};
    if (bpf_probe_read_user(&m, sizeof(m), (void *)(c->buf + (u64)c->i * UFFD_MSG_SIZE)))
        return 0;
    c->i++;
    if (m.event == UFFD_EVENT_PAGEFAULT)
        match_msg(c->now, m.address, m.ptid);
    if (c->i < c->n)
        msg_parser.call(ctx, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_read)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    if (!maybe_tracked(tid))
        return 0;
    struct read_stash *rsp = readstash.lookup(&tid);
    if (!rsp)
        return 0;
    struct read_stash rs = *rsp;
    if (readstash.delete(&tid) == 0)
        hint_add(tid, HINT_DEC);
    long ret = args->ret;
    if (targets.lookup(&rs.tgid)) {
        struct uf_stats *s = get_ufstats(rs.tgid, rs.fd);
        if (s) {
            __sync_fetch_and_add(&s->read_calls, 1);
            if (ret > 0)
                __sync_fetch_and_add(&s->msgs_read, ret / UFFD_MSG_SIZE);
        }
    }
    if (ret < UFFD_MSG_SIZE)
        return 0;
    u32 zero = 0;
    struct msg_cursor *c = msg_cursor.lookup(&zero);
    if (!c)
        return 0;
    u32 n = ret / UFFD_MSG_SIZE;
    c->buf = rs.buf;
    c->now = bpf_ktime_get_ns();
    c->i = 0;
    c->n = n < MAX_MSGS ? n : MAX_MSGS;
    msg_parser.call(args, 0);
    return 0;
}

/* ---------------------------------------------------------------- ioctls */

static __always_inline u64 read_u64(u64 uaddr)
{
    u64 v = 0;
    bpf_probe_read_user(&v, sizeof(v), (void *)uaddr);
    return v;
}

static __always_inline void stash_inflight(u32 tid, struct inflight *io)
{
    if (inflight.insert(&tid, io) == 0)
        hint_add(tid, HINT_INC);
    else
        inflight.update(&tid, io); /* an entry left by an ioctl whose exit we missed */
}

TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
    u32 cmd = (u32)args->cmd;
    u32 type = (cmd >> 8) & 0xff;
    if (type != IOC_TYPE_UFFD && type != IOC_TYPE_KVM)
        return 0; /* the common case: one compare */
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    s32 fd = (s32)args->fd;
    u64 arg = args->arg;

    if (cmd == KVM_RUN) {
        if (!followed(tgid, 1))
            return 0;
        struct tstate *t = get_tstate(tid, tgid);
        if (!t)
            return 0;
        t->in_run = 1;
        if (t->efault_ts) {
            /* vCPU-exit mode: the thread resolved its own fault and re-enters */
            u64 now = bpf_ktime_get_ns();
            struct tstats *s = get_stats(tid, tgid);
            if (s)
                account_stall(s, now - t->efault_ts);
            t->efault_ts = 0;
            dbg_inc(DBG_EXIT_STALLS);
        }
        if (t->vcpu < 0) {
            struct fd_key k = {.tgid = tgid, .fd = fd};
            struct vcpu_fd_val *v = vcpu_fds.lookup(&k);
            if (v) {
                t->vcpu = v->vcpu;
                struct vcpu_info vi = {.tgid = tgid, .vcpu = v->vcpu, .how = v->how};
                vcpus.update(&tid, &vi);
            }
        }
        return 0;
    }

    struct inflight io = {.cmd = cmd, .fd = fd, .arg = arg, .tgid = tgid};
    if (type == IOC_TYPE_KVM) {
        if (cmd != KVM_CREATE_VCPU || !followed(tgid, 1))
            return 0;
        io.kind = IO_KVM_CREATE_VCPU;
        stash_inflight(tid, &io);
        return 0;
    }

    /* a uffd ioctl (type 0xAA belongs to userfaultfd alone) */
    u32 nr = cmd & 0xff;
    followed(tgid, 1);
    if (cmd == USERFAULTFD_IOC_NEW) {
        io.kind = IO_UFFD_NEW; /* on /dev/userfaultfd; returns the new uffd */
    } else if (cmd == UFFDIO_REGISTER || cmd == UFFDIO_UNREGISTER) {
        io.kind = cmd == UFFDIO_REGISTER ? IO_UFFD_REGISTER : IO_UFFD_UNREGISTER;
        io.start = read_u64(arg);
        io.len = read_u64(arg + 8);
        remember_uffd(tgid, fd);
    } else if (nr >= UFFDIO_NR_WAKE && nr <= UFFDIO_NR_POISON) {
        io.kind = IO_UFFD_RESOLVE;
        io.start = read_u64(arg);
        /* uffdio_copy / uffdio_move: dst, src, len; the others start with a uffdio_range */
        io.len = read_u64(arg + ((nr == UFFDIO_NR_COPY || nr == UFFDIO_NR_MOVE) ? 16 : 8));
        u64 page = io.start & PAGE_MASK_4K;
        u64 *rt = read_pages.lookup(&page);
        if (rt) {
            io.read_ts = *rt;
            read_pages.delete(&page);
        }
        remember_uffd(tgid, fd);
    } else {
        return 0; /* UFFDIO_API and unknown ones */
    }
    /* kept for every process: the wake-up test needs to know that the waker
     * is inside a resolving ioctl, whoever the waker is */
    stash_inflight(tid, &io);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    if (!maybe_tracked(tid))
        return 0;
    struct inflight *iop = inflight.lookup(&tid);
    if (!iop)
        return 0;
    struct inflight io = *iop;
    if (inflight.delete(&tid) == 0)
        hint_add(tid, HINT_DEC);
    long ret = args->ret;

    if (io.kind == IO_KVM_CREATE_VCPU) {
        if (ret >= 0) {
            struct fd_key k = {.tgid = io.tgid, .fd = (s32)ret};
            struct vcpu_fd_val v = {.vcpu = (s32)io.arg, .how = HOW_CREATE_VCPU};
            vcpu_fds.update(&k, &v);
        }
        return 0;
    }
    if (io.kind == IO_UFFD_NEW) {
        if (ret >= 0)
            remember_uffd(io.tgid, (s32)ret);
        return 0;
    }
    if (io.kind == IO_UFFD_REGISTER) {
        if (ret == 0 && io.len)
            uffd_range_add(io.tgid, io.start, io.len);
        return 0;
    }
    if (io.kind == IO_UFFD_UNREGISTER) {
        if (ret == 0)
            uffd_range_remove(io.tgid, io.start, io.len);
        return 0;
    }
    /* IO_UFFD_RESOLVE: per-uffd counters, followed processes only */
    if (!targets.lookup(&io.tgid))
        return 0;
    struct uf_stats *s = get_ufstats(io.tgid, io.fd);
    if (!s)
        return 0;
    u32 nr = io.cmd & 0xff;
    s64 done = 0; /* bytes the kernel reports as installed (partial on error) */
    if (nr == UFFDIO_NR_COPY) {
        __sync_fetch_and_add(&s->copies, 1);
        done = (s64)read_u64(io.arg + 32);
    } else if (nr == UFFDIO_NR_MOVE) {
        done = (s64)read_u64(io.arg + 32);
    } else if (nr == UFFDIO_NR_ZEROPAGE) {
        __sync_fetch_and_add(&s->zeropages, 1);
        done = (s64)read_u64(io.arg + 24);
    } else if (nr == UFFDIO_NR_CONTINUE) {
        __sync_fetch_and_add(&s->continues, 1);
        done = (s64)read_u64(io.arg + 24);
    } else if (nr == UFFDIO_NR_WAKE) {
        __sync_fetch_and_add(&s->wakes, 1);
    }
    if (done > 0) {
        __sync_fetch_and_add(&s->bytes_installed, (u64)done);
        __sync_fetch_and_add(&s->pages_installed, (u64)done >> 12);
    }
    if (ret == -ERR_EEXIST)
        __sync_fetch_and_add(&s->eexist, 1);
    return 0;
}

/* ---------------------------------------------------------------- KVM_RUN returns */

#ifdef HAVE_KVM_USERSPACE_EXIT
TRACEPOINT_PROBE(kvm, kvm_userspace_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct tstate *t = tstate.lookup(&tid);
    if (!t)
        return 0; /* KVM_RUN entry not seen: not followed */
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
    }
    return 0;
}
#endif
