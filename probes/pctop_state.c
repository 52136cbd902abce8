/* pctop probes, part 2 of 6: the maps and the helpers every program uses
 * (configuration, per-thread state, per-interval statistics, uffd ranges).
 * See pctop.bpf.c for the life of a fault these serve. */

BPF_ARRAY(config, u64, CFG_SLOTS);
/* Arrays whose elements are sized in cache lines. A plain array's values start
 * where the kernel's struct bpf_array ends (312 bytes in, 56 mod 64, on 6.18),
 * so a 64-byte element spans two lines and shares each with a neighbour; an
 * mmapable array's values start on a page (bench/RESULTS.md, #17). */
#define LINE_ARRAY(name, type, n) BPF_F_TABLE("array", int, type, name, n, BPF_F_MMAPABLE)

/* The thread each CPU switched to last: tells whether a thread that looks on
 * CPU has left it in a switch perf did not deliver (see back_on_cpu). Written
 * on every context switch, read from other CPUs: one cache line per CPU, or
 * neighbouring CPUs' switches would keep taking the line from each other. */
#define MAX_CPUS 4096
struct cpu_cur_line {
    u32 tid;
    u32 pad[15];
};
LINE_ARRAY(cpu_cur, struct cpu_cur_line, MAX_CPUS);
/* per CPU: bumped on every fault by whichever CPU sees it; user space sums */
BPF_PERCPU_ARRAY(dbg, u64, DBG_SLOTS);
BPF_HASH(targets, u32, u32, 4096);
/* A followed process's name, taken when it is adopted (in its own context or,
 * for a fork child, its parent's): it outlives the process, whose /proc entry
 * may be gone before user space reads it. */
BPF_HASH(comms, u32, struct comm_name, 4096);
/* Which process a uffd resolves faults for, when that is another process than
 * the one holding it (a separate handler): learned from its reads and wake-ups.
 * key = the holder's (tgid, fd), value = the faulting tgid. */
BPF_HASH(serves, struct fd_key, u32, 4096);
/* `--comm NAME`: the name, as the kernel keeps it (at most 15 bytes, NUL-padded) */
BPF_ARRAY(comm_filter, struct comm_name, 1);
BPF_HASH(ranges, u32, struct range_set, 1024);
BPF_PERCPU_ARRAY(range_zero, struct range_set, 1);
BPF_HASH(uffd_fds, struct fd_key, u32, 16384);
BPF_HASH(vcpu_fds, struct fd_key, struct vcpu_fd_val, 16384);
BPF_HASH(vcpus, u32, struct vcpu_info, 16384);
BPF_HASH(tstate, u32, struct tstate, 65536); /* spill-over of tstate_slots (below) */
/* Direct-mapped by page number, not an LRU hash: it is written on every fault
 * (an LRU update costs several times an array store), and pages 256 MiB apart
 * that fault at the same moment only cost the second one its address match. */
BPF_ARRAY(pending_addr, struct pending_fault, PENDING_SLOTS);
/* Read times of messages no thread was found for (weak vCPU faults without a
 * thread id: every fault of a PVM or VMX vCPU whose VMM reads without one), for
 * the resolving ioctl of that page: direct-mapped by page number like
 * pending_addr, since both ends run once per such fault. */
BPF_ARRAY(read_pages, struct page_time, PENDING_SLOTS);
/* How many read_pages slots hold a read time no ioctl took yet. Where every
 * message finds its thread (thread ids, or strong faults matched by address)
 * it stays 0, and a resolving ioctl skips its lookup: a random slot of a 1 MiB
 * array, ~70 ns a fault here (bench/RESULTS.md, #17). A stale slot (its page
 * was installed by a range that started elsewhere) keeps it above 0, which
 * only costs the lookup again. Changed only by whoever wins the slot's
 * compare-and-swap, so it never counts a slot twice. */
BPF_ARRAY(read_pages_held, s64, 1);

static __always_inline void read_pages_add(s64 delta)
{
    u32 zero = 0;
    s64 *n = read_pages_held.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, delta);
}

/* The slot of a 4 KiB-aligned page in those two direct-mapped arrays. */
static __always_inline u32 page_slot(u64 page)
{
    return (page >> 12) & (PENDING_SLOTS - 1);
}
BPF_HASH(stats, struct tkey, struct tstats, 65536);
BPF_PERCPU_ARRAY(stats_zero, struct tstats, 1);
BPF_HASH(exits, struct exit_key, u64, 65536);
BPF_HASH(ufstats, struct uf_key, struct uf_stats, 16384);
/* Which pages were installed (CFG_PAGE_MAP on): 65536 words = 16 GiB per interval. */
BPF_HASH(page_map, struct pm_key, u64, 65536);
BPF_HASH(page_spans, struct span_key, u64, 4096);

/* The per-thread state (tstate) is consulted on events that fire for every
 * thread of the host: each context switch and wake-up. A count of a tid slot's
 * states, in an array (lookup inlined, no hashing), lets the common untracked
 * case skip the lookups. Every successful insert adds one, every successful
 * delete takes one away; all of them happen in the thread's own context, so
 * they never race. In-flight syscalls are not counted here: their exits look
 * at the thread's own in-flight slot instead, which no other CPU writes, where
 * an update of this array would take its cache line from the CPUs reading it
 * at every context switch. */
BPF_ARRAY(tid_hint, u32, HINT_SLOTS);

/* Threads a fault woke whose process is not known to hold that uffd (a handler
 * that got it from another process): its next read() of an unknown fd is looked
 * at (pctop.bpf.c maybe_reader). Slot by tid; `maybe_readers` counts the set
 * slots, so every other read() of the host costs one lookup of a hot word. */
BPF_ARRAY(reader_hint, u32, HINT_SLOTS);
BPF_ARRAY(maybe_readers, s64, 1);

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

/* Known uffds, cached by (tgid, fd) slot: every read() of a process holding a
 * uffd and every uffd ioctl asks whether its fd is a uffd, and an inlined array
 * compare saves the uffd_fds hash lookup (bench/RESULTS.md). A slot holds the key
 * (tgid << 32 | fd) of one known uffd, 0 if none. `uffd_fds` stays the truth: a
 * miss looks there and caches what it finds, over whatever the slot held (either
 * key is right to keep). Whoever forgets a uffd clears its slot (forget_uffd,
 * EbpfSource._prune_uffd_fds). */
BPF_ARRAY(uffd_fd_slots, u64, UFFD_FD_SLOTS);

static __always_inline u64 *uffd_fd_slot(u32 tgid, s32 fd, u64 *key)
{
    *key = ((u64)tgid << 32) | (u32)fd;
    u32 k = ((tgid << UFFD_FD_SLOT_SHIFT) + (u32)fd) & (UFFD_FD_SLOTS - 1);
    return uffd_fd_slots.lookup(&k);
}

static __always_inline int is_uffd(u32 tgid, s32 fd)
{
    u64 key;
    u64 *slot = uffd_fd_slot(tgid, fd, &key);
    if (slot && *slot == key)
        return 1;
    struct fd_key k = {.tgid = tgid, .fd = fd};
    if (!uffd_fds.lookup(&k))
        return 0;
    if (slot)
        *slot = key;
    return 1;
}

/* The fd is no longer a uffd. (A read or ioctl racing with the close on another
 * thread may cache it again: the application's own race, and the next read that
 * returns no whole messages forgets it.) Returns 1 if it was known. */
static __always_inline int forget_uffd(u32 tgid, s32 fd)
{
    u64 key;
    u64 *slot = uffd_fd_slot(tgid, fd, &key);
    if (slot && *slot == key)
        *slot = 0;
    struct fd_key k = {.tgid = tgid, .fd = fd};
    return uffd_fds.delete(&k) == 0;
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

static __always_inline void dbg_add(u32 slot, u64 n)
{
    u64 *v = dbg.lookup(&slot);
    if (v)
        *v += n; /* this CPU's copy, and programs do not nest on one CPU */
}

static __always_inline void dbg_inc(u32 slot)
{
    dbg_add(slot, 1);
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

/* Followed processes, cached by tgid slot (tgid mod HINT_SLOTS): whether a
 * process is followed is asked on every uffd fault, read and ioctl, and on every
 * page fault of the host; an inlined array compare saves the targets hash lookup
 * (~50-75 ns here, bench/RESULTS.md). `targets` stays the truth, with the flags
 * user space reads. The rule that makes a miss safe: a slot that a followed tgid
 * maps to is never 0. So whoever follows a tgid puts it in its slot when the slot
 * is 0 (adopt here, EbpfSource.add_pid), and a forgotten tgid's slot becomes
 * TARGET_SLOT_GONE, not 0 (EbpfSource._forget). A slot of 0 means "not followed"
 * at once; a slot holding another value sends the question to `targets` (a tgid
 * that shares its slot with another), which then caches it over a GONE.
 * 64-bit for the BPF compare-and-swap. */
BPF_ARRAY(target_slots, u64, HINT_SLOTS);

/* A followed tgid takes its slot if it was empty or left GONE (`was`, read before). */
static __always_inline void take_target_slot(u64 *slot, u64 was, u32 tgid)
{
    if (was == 0 || was == TARGET_SLOT_GONE)
        __sync_val_compare_and_swap(slot, was, (u64)tgid);
}

static __always_inline int is_target(u32 tgid)
{
    u32 k = tgid & (HINT_SLOTS - 1);
    u64 *slot = target_slots.lookup(&k);
    if (!slot)
        return 0;
    u64 was = *slot;
    if (was == tgid)
        return 1;
    if (was == 0 || !targets.lookup(&tgid))
        return 0;
    take_target_slot(slot, was, tgid);
    return 1;
}

/* Follow tgid from now on. `own`: the caller runs in that process (or, for a
 * fork child, in its parent), so the current comm is its name. */
static __always_inline void adopt(u32 tgid, u32 flag, int own)
{
    u32 k = tgid & (HINT_SLOTS - 1);
    u64 *slot = target_slots.lookup(&k);
    if (slot)
        take_target_slot(slot, *slot, tgid); /* before `targets` (see target_slots) */
    targets.update(&tgid, &flag);
    if (own) {
        struct comm_name c = {};
        bpf_get_current_comm(&c.c, sizeof(c.c));
        comms.update(&tgid, &c);
    }
}

/* Is this process followed? In follow_all mode, `adopt_it` adds it (the caller
 * saw it use userfaultfd or KVM, so none of its later faults is missed). */
static __always_inline int followed(u32 tgid, int adopt_it)
{
    if (is_target(tgid))
        return 1;
    if (adopt_it && cfg(CFG_FOLLOW_ALL)) {
        adopt(tgid, TARGET_AUTO, 1);
        return 1;
    }
    return 0;
}

/* Per-thread state lives in an array slot by tid (tid mod HINT_SLOTS, claimed by
 * compare-and-swap in the thread's own context): every probe looks it up, and an
 * array lookup is inlined where a hash lookup hashes and walks a bucket. A thread
 * whose slot another live tid holds keeps its state in the hash map instead, as do
 * the in-flight ioctls and reads (below); `spilled` counts those hash entries so the
 * common case never hashes. */
LINE_ARRAY(tstate_slots, struct tstate_slot, HINT_SLOTS);
#define SPILL_INFLIGHT 0
#define SPILL_TSTATE 1
BPF_ARRAY(spilled, s64, 2);

static __always_inline int has_spill(u32 which)
{
    s64 *n = spilled.lookup(&which);
    return n && *n > 0;
}

static __always_inline void spill_add(u32 which, s64 delta)
{
    s64 *n = spilled.lookup(&which);
    if (n)
        __sync_fetch_and_add(n, delta);
}

static __always_inline struct tstate *tstate_of(u32 tid)
{
    u32 k = tid & (HINT_SLOTS - 1);
    struct tstate_slot *sl = tstate_slots.lookup(&k);
    if (sl && sl->owner == tid)
        return &sl->t;
    return has_spill(SPILL_TSTATE) ? tstate.lookup(&tid) : 0;
}

static __always_inline struct tstate *get_tstate(u32 tid, u32 tgid)
{
    struct tstate *t = tstate_of(tid);
    if (t)
        return t;
    struct tstate z = {};
    z.tgid = tgid;
    z.vcpu = -1;
    z.cpu = bpf_get_smp_processor_id() + 1; /* created in its own context */
    u32 k = tid & (HINT_SLOTS - 1);
    struct tstate_slot *sl = tstate_slots.lookup(&k);
    if (sl && __sync_val_compare_and_swap(&sl->owner, 0, (u64)tid) == 0) {
        sl->t = z;
        hint_add(tid, HINT_INC);
        return &sl->t;
    }
    if (tstate.insert(&tid, &z) == 0) {
        hint_add(tid, HINT_INC);
        spill_add(SPILL_TSTATE, 1);
    }
    return tstate.lookup(&tid);
}

/* The thread has exited: free its state (its own context). */
static __always_inline void drop_tstate(u32 tid)
{
    u32 k = tid & (HINT_SLOTS - 1);
    struct tstate_slot *sl = tstate_slots.lookup(&k);
    if (sl && sl->owner == tid) {
        sl->owner = 0;
        hint_add(tid, HINT_DEC);
    } else if (has_spill(SPILL_TSTATE) && tstate.delete(&tid) == 0) {
        hint_add(tid, HINT_DEC);
        spill_add(SPILL_TSTATE, -1);
    }
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

/* A thread's statistics are written only from events serialized with the thread
 * itself (its own context, or its switch-in, which the scheduler orders after its
 * switch-out): plain adds, no atomics (sched_switch -30 to -44 ns per fault,
 * bench/RESULTS.md). */
static __always_inline void account_stall(struct tstats *s, u64 stall)
{
    s->faults += 1;
    s->stall_ns += stall;
    if (stall > s->max_ns)
        s->max_ns = stall;
    u32 b = hist_bucket(stall);
    if (b < HIST_BUCKETS)
        s->hist[b] += 1;
}

static __always_inline void clear_fault(struct tstate *t)
{
    t->early_wake_ts = 0;
    t->phase = PH_NONE;
    t->fault_ts = 0;
    t->addr = 0;
    t->sleep_ts = 0;
    t->read_ts = 0;
    t->wake_ts = 0;
}

/* ---------------------------------------------------------------- ranges */

/* Slots 0..n-1 of a range_set. Unrolling off and the index masked keep the
 * verifier's bounds simple (an unrolled loop defeated it). */
#define FOR_EACH_RANGE(i, n) \
    _Pragma("clang loop unroll(disable)") \
    for (u32 i = 0; i < MAX_RANGES; i++) \
        if (i >= (n)) \
            break; \
        else

static __always_inline int uffd_range_hit(u32 tgid, u64 addr)
{
    struct range_set *rs = ranges.lookup(&tgid);
    if (!rs)
        return 0;
    if (rs->overflow)
        return 1;
    u32 n = rs->n;
    FOR_EACH_RANGE(i, n) {
        struct uffd_range *r = &rs->r[i & (MAX_RANGES - 1)];
        if (addr >= r->start && addr < r->end)
            return 1;
    }
    return 0;
}

static __always_inline struct range_set *range_set_of(u32 tgid)
{
    struct range_set *rs = ranges.lookup(&tgid);
    if (rs)
        return rs;
    u32 zero = 0;
    struct range_set *z = range_zero.lookup(&zero);
    if (!z)
        return 0;
    ranges.insert(&tgid, z);
    return ranges.lookup(&tgid);
}

static __always_inline void uffd_range_add(u32 tgid, u64 start, u64 len)
{
    struct range_set *rs = range_set_of(tgid);
    if (!rs)
        return;
    u32 n = rs->n;
    /* reuse a hole left by UFFDIO_UNREGISTER first */
    FOR_EACH_RANGE(i, n) {
        struct uffd_range *r = &rs->r[i & (MAX_RANGES - 1)];
        if (r->start == r->end) {
            r->start = start;
            r->end = start + len;
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
    FOR_EACH_RANGE(i, n) {
        struct uffd_range *r = &rs->r[i & (MAX_RANGES - 1)];
        /* only whole registrations inside the unregistered span go; a partial
         * unregister keeps the range (a stale range only makes candidates,
         * which still need a uffd wake-up to count) */
        if (r->start >= start && r->end <= start + len)
            r->start = r->end = 0;
    }
}

/* ---------------------------------------------------------------- end of a stall */

/* The thread runs again: a woken stall ends here (stall and its parts are
 * accounted), a preempted fault goes on. Called at its switch-in and, because
 * perf drops a tracepoint event that fires while another one is being handled
 * on the same CPU (seen for sched_switch here: a vCPU faulting again with no
 * switch-in traced), from every event that shows the thread running. */
static __always_inline void back_on_cpu(u32 tid, struct tstate *t, u64 now)
{
    if (t->phase == PH_PREEMPTED) {
        t->phase = PH_FAULTED; /* still in its fault: it may sleep next */
        t->sleep_ts = 0;
        return;
    }
    if (t->phase != PH_WOKEN)
        return;
    u64 start = t->fault_ts ? t->fault_ts : t->sleep_ts;
    u64 stall = now > start ? now - start : 0;
    u64 runq = now > t->wake_ts ? now - t->wake_ts : 0;
    struct tstats *s = get_stats(tid, t->tgid);
    if (s) {
        account_stall(s, stall);
        s->runq_ns += runq;
        if (t->read_ts) {
            u64 rd = t->read_ts > start ? t->read_ts : start;
            s->queued_ns += rd - start;
            if (t->wake_ts > rd)
                s->service_ns += t->wake_ts - rd;
        } else {
            s->faults_no_read += 1;
        }
    }
    clear_fault(t);
}

/* An event in the thread's own context: if we still think it is off CPU, it
 * came back in a switch perf did not deliver; if a uffd ioctl woke it while it
 * was on its CPU and it went on without leaving it, that stall ended at the
 * wake-up (no run-queue part). */
static __always_inline void running_now(u32 tid, struct tstate *t)
{
    if (t->phase == PH_WOKEN || t->phase == PH_PREEMPTED) {
        dbg_inc(DBG_LOST_SWITCH_IN);
        back_on_cpu(tid, t, bpf_ktime_get_ns());
    } else if (t->phase == PH_FAULTED && t->early_wake_ts) {
        dbg_inc(DBG_ON_CPU_END);
        t->phase = PH_WOKEN;
        t->wake_ts = t->early_wake_ts;
        back_on_cpu(tid, t, t->early_wake_ts);
    }
}

/* ---------------------------------------------------------------- in-flight slots */

/* In-flight uffd/KVM ioctls and (without HAVE_TASK_PT_REGS) uffd read()s, per
 * thread: in an array slot by tid (no hash bucket lock, which costs ~0.1 us a
 * take on these VMs, on every uffd read and ioctl); the hash map holds the rare
 * thread whose slot another tid holds. */
LINE_ARRAY(inflight_slots, struct inflight_slot, HINT_SLOTS);
BPF_HASH(inflight, u32, struct inflight, 16384);

/* The calling thread's in-flight syscall: its slot if free or already its own (a
 * syscall whose exit we missed), else the hash map. */
static __always_inline void stash_inflight(u32 tid, struct inflight *io)
{
    u32 k = tid & (HINT_SLOTS - 1);
    struct inflight_slot *sl = inflight_slots.lookup(&k);
    if (sl) {
        u64 was = sl->owner == tid ? tid : __sync_val_compare_and_swap(&sl->owner, 0, (u64)tid);
        if (was == 0 || was == tid) {
            sl->io = *io;
            return;
        }
    }
    if (inflight.insert(&tid, io) == 0) {
        spill_add(SPILL_INFLIGHT, 1);
    } else {
        inflight.update(&tid, io);
    }
}

/* The range of a resolving uffd ioctl, read from its argument the first time it
 * is needed: at a wake-up inside the ioctl, or at its exit. Either way the kernel
 * has copied the struct by then, so the user read finds it warm; at the ioctl's
 * entry the same read cost twice as much here (bench/RESULTS.md, #17). The
 * ioctl's claim on a read time kept for its first page (read_pages) is taken
 * here too. */
static __always_inline void resolve_range(struct inflight *io)
{
    if (io->range_read)
        return;
    io->range_read = 1;
    /* uffdio_copy / uffdio_move: dst, src, len, mode; the others a uffdio_range,
     * then mode. One user read of the first 32 bytes. */
    u64 r[4] = {};
    if (bpf_probe_read_user(r, sizeof(r), (void *)io->arg)) /* UFFDIO_WAKE's is 16 bytes */
        bpf_probe_read_user(r, 2 * sizeof(u64), (void *)io->arg);
    u32 nr = io->cmd & 0xff;
    int three = nr == UFFDIO_NR_COPY || nr == UFFDIO_NR_MOVE;
    io->start = r[0];
    io->len = three ? r[2] : r[1];
    u64 mode = three ? r[3] : r[2];
    if (nr == UFFDIO_NR_WAKE)
        io->wakes = 1;
    else if (nr == UFFDIO_NR_WRITEPROTECT)
        io->wakes = !(mode & (UFFDIO_WP_MODE_WP | UFFDIO_WP_MODE_DONTWAKE));
    else
        io->wakes = !(mode & UFFDIO_MODE_DONTWAKE);
    u32 zero = 0;
    s64 *held = read_pages_held.lookup(&zero);
    if (!held || *held <= 0)
        return;
    u64 page = io->start & PAGE_MASK_4K;
    u32 slot = page_slot(page);
    struct page_time *pt = read_pages.lookup(&slot);
    if (pt && pt->page == page) {
        u64 ts = pt->ts;
        if (__sync_val_compare_and_swap(&pt->page, page, 0) == page) {
            io->read_ts = ts;
            read_pages_add(-1);
        }
    }
}

/* Read without taking: only the owning thread itself (current) may call this. */
static __always_inline struct inflight *peek_inflight(u32 tid)
{
    u32 k = tid & (HINT_SLOTS - 1);
    struct inflight_slot *sl = inflight_slots.lookup(&k);
    if (sl && sl->owner == tid)
        return &sl->io;
    return has_spill(SPILL_INFLIGHT) ? inflight.lookup(&tid) : 0;
}

/* Take (copy out and free) the thread's in-flight syscall; 0 if it has none. */
static __always_inline int take_inflight(u32 tid, struct inflight *out)
{
    u32 k = tid & (HINT_SLOTS - 1);
    struct inflight_slot *sl = inflight_slots.lookup(&k);
    if (sl && sl->owner == tid) {
        *out = sl->io;
        sl->owner = 0; /* only the owner frees its slot */
        return 1;
    }
    if (!has_spill(SPILL_INFLIGHT))
        return 0;
    struct inflight *p = inflight.lookup(&tid);
    if (!p)
        return 0;
    *out = *p;
    if (inflight.delete(&tid) == 0)
        spill_add(SPILL_INFLIGHT, -1);
    return 1;
}
