/* pctop probes, part 4 of 6 (after pctop_defs.h, pctop_state.c and
 * pctop.bpf.c): the handler's side of a fault. Its read() of the uffd (each
 * message names the faulting thread or page: steps 3 of the life of a fault in
 * pctop.bpf.c) and its uffd ioctls: registrations (the ranges whose faults are
 * candidates), installs and wakes (step 4: the wake-up happens inside them),
 * with per-uffd counters and the page map of what each install covered; and the
 * KVM ioctls that name vCPUs. */

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
    if (is_uffd(tgid, fd))
        return;
    struct fd_key k = {.tgid = tgid, .fd = fd};
    u32 one = 1;
    uffd_fds.update(&k, &one);
    u64 key;
    u64 *cached = uffd_fd_slot(tgid, fd, &key);
    if (cached)
        *cached = key;
    u32 slot = tgid & (HINT_SLOTS - 1);
    u32 *h = uffd_tgid_hint.lookup(&slot);
    if (h)
        *h = 1;
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

/* Which read()s are looked at: of a known uffd (IO_UFFD_READ), or, by a thread a
 * fault woke, of an fd not known as one (IO_MAYBE_UFFD_READ, see maybe_reader).
 * Fills io and returns its kind, 0 for every other read() of the host (one array
 * lookup for a process that never held a uffd). */
static __always_inline u32 read_kind(u64 id, s32 fd, u64 buf, struct inflight *io)
{
    u32 tid = (u32)id, tgid = id >> 32;
    io->arg = buf;
    io->fd = fd;
    io->tgid = tgid;
    io->kind = 0;
    u32 slot = tgid & (HINT_SLOTS - 1);
    u32 *h = uffd_tgid_hint.lookup(&slot);
    if (h && *h && is_uffd(tgid, fd)) {
        io->kind = IO_UFFD_READ;
        return io->kind;
    }
    u32 zero = 0;
    s64 *n = maybe_readers.lookup(&zero);
    if (!n || *n <= 0)
        return 0;
    u32 rslot = tid & (HINT_SLOTS - 1);
    u32 *r = reader_hint.lookup(&rslot);
    if (!r || *r != tid)
        return 0;
    io->kind = IO_MAYBE_UFFD_READ;
    return io->kind;
}

#ifdef HAVE_TASK_PT_REGS
/* read()'s fd and buffer at its exit, from the registers the syscall entry saved
 * (x86-64: fd in di, buf in si; nothing in the syscall changes them): one
 * tracepoint per read() of the host instead of two, and no in-flight slot
 * (bench/RESULTS.md, #17). The loader defines HAVE_TASK_PT_REGS where the kernel
 * has bpf_get_current_task_btf and bpf_task_pt_regs (BTF, 5.15+). */
static __always_inline u32 read_at_exit(u64 id, struct inflight *io)
{
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    return read_kind(id, (s32)regs->di, regs->si, io);
}
#else
TRACEPOINT_PROBE(syscalls, sys_enter_read)
{
    u64 id = bpf_get_current_pid_tgid();
    struct inflight io = {};
    if (read_kind(id, (s32)args->fd, (u64)args->buf, &io))
        stash_inflight((u32)id, &io);
    return 0;
}
#endif

/* A read() of an fd not known as a uffd, by a thread a fault woke: it is a uffd
 * if it returned whole messages, the first a page fault of a thread that waits on
 * that page (by its thread id, or by the page's faulters). Returns the faulting
 * process, 0 if not. */
static __always_inline u32 first_read_of_a_uffd(struct inflight *rs, long ret)
{
    if (ret < UFFD_MSG_SIZE || (ret % UFFD_MSG_SIZE))
        return 0;
    struct uffd_msg_head m = {};
    if (bpf_probe_read_user(&m, sizeof(m), (void *)rs->arg))
        return 0;
    if (m.event != UFFD_EVENT_PAGEFAULT || m.reserved1 || m.reserved2 || m.reserved3)
        return 0;
    u64 page = m.address & PAGE_MASK_4K;
    struct tstate *t = m.ptid ? tstate_of(m.ptid) : 0;
    if (t && t->phase != PH_NONE && t->phase != PH_WOKEN)
        return t->tgid;
    u32 slot = page_slot(page);
    struct pending_fault *p = pending_addr.lookup(&slot);
    if (p && p->page == page && unread_fault_on(p->tid[0], page))
        return p->tgid;
    return 0;
}

/* One page-fault message: find the thread it names and note the read. */
static __always_inline void match_msg(u64 now, u64 addr, u32 ptid)
{
    u64 page = addr & PAGE_MASK_4K;
    if (ptid) {
        u32 key = ptid;
        struct tstate *t = tstate_of(key);
        if (t && t->phase != PH_WOKEN && (t->phase != PH_NONE || t->in_run)) {
            if (t->phase == PH_NONE) {
                /* read before any fault event (weak path): start from now */
                t->phase = PH_FAULTED;
                t->fault_ts = now;
            }
            if (!t->read_ts)
                t->read_ts = now;
            t->reader_known = 1;
            if (t->addr != page) {
                /* the message names the page it waits for (a weak fault's first
                 * address): among the page's faulters, for installed_unwoken */
                t->addr = page;
                add_faulter(page, ptid, t->tgid);
            }
            dbg_inc(DBG_MSG_BY_PTID);
            return;
        }
    }
    u32 slot = page_slot(page);
    struct pending_fault *p = pending_addr.lookup(&slot);
    if (p && p->page == page) {
#pragma unroll
        for (int i = 0; i < PENDING_TIDS; i++) {
            struct tstate *t = unread_fault_on(p->tid[i], page);
            if (t) {
                t->read_ts = now;
                t->reader_known = 1;
                dbg_inc(DBG_MSG_BY_ADDR);
                return;
            }
        }
    }
    /* no thread known for it (weak vCPU fault without THREAD_ID): keep the
     * read time for the COPY that will resolve this page */
    struct page_time *pt = read_pages.lookup(&slot);
    if (pt) {
        pt->ts = now; /* before the page, which lets an ioctl take it */
        u64 was = pt->page;
        if (was != page && __sync_val_compare_and_swap(&pt->page, was, page) == was && !was)
            read_pages_add(1);
    }
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
    u32 tgid; /* the reader's */
    u32 pad;
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
    else if (m.event == UFFD_EVENT_FORK)
        remember_uffd(c->tgid, (s32)(u32)m.flags); /* made in this read(), in the reader */
    if (c->i < c->n)
        msg_parser.call(ctx, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_read)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct inflight rs;
#ifdef HAVE_TASK_PT_REGS
    if (!read_at_exit(id, &rs))
        return 0;
#else
    if (!take_inflight(tid, &rs))
        return 0;
#endif
    long ret = args->ret;
    if (rs.kind == IO_MAYBE_UFFD_READ) {
        reader_seen(tid);
        u32 faulting = first_read_of_a_uffd(&rs, ret);
        if (!faulting)
            return 0;
        remember_uffd(rs.tgid, rs.fd);
        dbg_inc(DBG_READER_FOUND);
        if (faulting != rs.tgid) {
            if (!is_target(rs.tgid))
                adopt(rs.tgid, TARGET_HANDLER, 1);
            struct fd_key k = {.tgid = rs.tgid, .fd = rs.fd};
            serves.update(&k, &faulting);
        }
    } else if (rs.kind != IO_UFFD_READ) {
        return 0; /* an ioctl, clone or other entry whose exit we missed */
    }
    if (ret > 0 && (ret % UFFD_MSG_SIZE)) {
        /* a uffd returns whole messages only: the fd number is another file now
         * (closed and reused in a way no traced call showed) */
        forget_uffd(rs.tgid, rs.fd);
        dbg_inc(DBG_NOT_UFFD_READ);
        return 0;
    }
    if (is_target(rs.tgid)) {
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
    c->buf = rs.arg;
    c->tgid = rs.tgid;
    c->now = bpf_ktime_get_ns();
    c->i = 0;
    c->n = n < MAX_MSGS ? n : MAX_MSGS;
    msg_parser.call(args, 0);
    return 0;
}

/* ---------------------------------------------------------------- page map */

static __always_inline void page_map_lost(struct uf_stats *s, u64 pages)
{
    __sync_fetch_and_add(&s->page_map_lost, pages);
    dbg_add(DBG_PAGE_MAP_LOST, pages);
}

/* Record the pages of one install [start, start + bytes) of uffd (tgid, fd):
 * OR their bits into the page-map words (atomically: installs on one uffd run
 * on several CPUs at once). An install of more than PAGE_MAP_MAX_WORDS words
 * is kept as one span. Pages that find the map full are counted, not lost
 * silently. Only called with CFG_PAGE_MAP on. */
static __always_inline void page_map_mark(u32 tgid, s32 fd, u64 start, u64 bytes, struct uf_stats *s)
{
    u64 first = start >> 12, n = bytes >> 12;
    if (!n)
        return;
    u64 last = first + n - 1;
    u64 w0 = first >> 6, w1 = last >> 6;
    u32 epoch = (u32)cfg(CFG_EPOCH);
    if (w1 - w0 >= PAGE_MAP_MAX_WORDS) {
        struct span_key sk = {.tgid = tgid, .fd = fd, .epoch = epoch, .start = first << 12};
        u64 len = n << 12;
        u64 *old = page_spans.lookup(&sk);
        if (old) {
            if (*old < len)
                *old = len;
        } else if (page_spans.update(&sk, &len) != 0) {
            page_map_lost(s, n);
        }
        return;
    }
    _Pragma("clang loop unroll(disable)")
    for (u32 i = 0; i < PAGE_MAP_MAX_WORDS; i++) {
        u64 w = w0 + i;
        if (w > w1)
            break;
        u64 lo = w == w0 ? (first & 63) : 0;
        u64 hi = w == w1 ? (last & 63) : 63;
        u64 mask = (hi == 63 ? ~0ULL : (1ULL << (hi + 1)) - 1) & ~((1ULL << lo) - 1);
        struct pm_key k = {.tgid = tgid, .fd = fd, .epoch = epoch, .word = w};
        u64 *v = page_map.lookup(&k);
        if (!v && page_map.insert(&k, &mask) == 0)
            continue;
        if (!v)
            v = page_map.lookup(&k); /* another CPU inserted it first */
        if (v)
            __sync_fetch_and_or(v, mask);
        else
            page_map_lost(s, hi - lo + 1);
    }
}

/* ---------------------------------------------------------------- ioctls */

static __always_inline u64 read_u64(u64 uaddr)
{
    u64 v = 0;
    bpf_probe_read_user(&v, sizeof(v), (void *)uaddr);
    return v;
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
        running_now(tid, t);
        t->early_wake_ts = 0;
        if (t->efault_ts) {
            /* vCPU-exit mode: the thread resolved its own fault and re-enters */
            u64 now = bpf_ktime_get_ns();
            struct tstats *s = get_stats(tid, tgid);
            if (s)
                account_stall(s, now - t->efault_ts);
            t->efault_ts = 0;
            t->efault_open = 0;
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
    int fol = followed(tgid, 1);
    io.followed = fol;
    if (cmd == USERFAULTFD_IOC_NEW) {
        io.kind = IO_UFFD_NEW; /* on /dev/userfaultfd; returns the new uffd */
    } else if (cmd == UFFDIO_REGISTER || cmd == UFFDIO_UNREGISTER) {
        if (!fol)
            return 0; /* ranges matter for followed processes only */
        io.kind = cmd == UFFDIO_REGISTER ? IO_UFFD_REGISTER : IO_UFFD_UNREGISTER;
        u64 r[2] = {};
        bpf_probe_read_user(r, sizeof(r), (void *)arg); /* struct uffdio_range */
        io.start = r[0];
        io.len = r[1];
        remember_uffd(tgid, fd);
    } else if (nr >= UFFDIO_NR_WAKE && nr <= UFFDIO_NR_POISON) {
        io.kind = IO_UFFD_RESOLVE; /* its range is read later (resolve_range) */
        remember_uffd(tgid, fd);
    } else {
        remember_uffd(tgid, fd); /* UFFDIO_API etc.: still tells this fd is a uffd */
        if (cmd == UFFDIO_API && fol) {
            u64 features = read_u64(arg + 8); /* struct uffdio_api: api, features, ioctls */
            if (features & UFFD_FEATURE_EVENT_FORK) {
                struct range_set *rs = range_set_of(tgid);
                if (rs)
                    rs->event_fork = 1;
            }
        }
        return 0;
    }
    /* kept for every process: the wake-up test needs to know that the waker
     * is inside a resolving ioctl, whoever the waker is */
    stash_inflight(tid, &io);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight io;
    if (!take_inflight(tid, &io) || io.kind == IO_UFFD_READ || io.kind >= IO_CLONE) {
        if (!maybe_tracked(tid))
            return 0;
        /* (a read, clone or recvmsg entry: a syscall whose exit we missed)
         * KVM_RUN is not stashed in flight: a vCPU-exit stall starts when the
         * memory-fault return leaves the syscall (KVM_RUN's return to the VMM),
         * not at kvm_userspace_exit, which still has KVM_RUN's tail to run */
        struct tstate *t = tstate_of(tid);
        if (t && t->efault_open) {
            t->efault_ts = bpf_ktime_get_ns();
            t->efault_open = 0;
        }
        return 0;
    }
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
    if (!io.followed && !is_target(io.tgid))
        return 0;
    resolve_range(&io);
    u32 nr = io.cmd & 0xff;
    /* Bytes installed: the whole range when the ioctl returns 0 (the kernel
     * returns 0 only if all of len was done); else the count it wrote back to
     * user space (partial with -EAGAIN, -errno if none), one user read. */
    s64 done = 0;
    u64 done_at = 0; /* offset of that count in the ioctl's struct */
    if (nr == UFFDIO_NR_COPY || nr == UFFDIO_NR_MOVE)
        done_at = 32;
    else if (nr == UFFDIO_NR_ZEROPAGE || nr == UFFDIO_NR_CONTINUE)
        done_at = 24;
    if (done_at)
        done = ret == 0 ? (s64)io.len : (s64)read_u64(io.arg + done_at);
    /* the kernel wakes the range's waiters after a successful install (or
     * un-protect, or UFFDIO_WAKE) unless told DONTWAKE */
    if (io.wakes && (ret == 0 || done > 0))
        installed_unwoken(&io);
    struct uf_stats *s = get_ufstats(io.tgid, io.fd);
    if (!s)
        return 0;
    if (nr == UFFDIO_NR_COPY)
        __sync_fetch_and_add(&s->copies, 1);
    else if (nr == UFFDIO_NR_ZEROPAGE)
        __sync_fetch_and_add(&s->zeropages, 1);
    else if (nr == UFFDIO_NR_CONTINUE)
        __sync_fetch_and_add(&s->continues, 1);
    else if (nr == UFFDIO_NR_WAKE)
        __sync_fetch_and_add(&s->wakes, 1);
    if (done > 0) {
        __sync_fetch_and_add(&s->bytes_installed, (u64)done);
        __sync_fetch_and_add(&s->pages_installed, (u64)done >> 12);
        if (cfg(CFG_PAGE_MAP))
            page_map_mark(io.tgid, io.fd, io.start, (u64)done, s);
    }
    if (ret == -ERR_EEXIST)
        __sync_fetch_and_add(&s->eexist, 1);
    return 0;
}
