/* pctop probes, part 5 of 6 (after pctop_defs.h, pctop_state.c, pctop.bpf.c
 * and pctop_handler.c): uffds that change hands. A uffd's fd number is what
 * ties a read() or an ioctl to a uffd, and processes pass uffds around:
 *   - close / dup2 / dup3 end an fd's life as a uffd (its number is reused at
 *     once by the next open, whose reads must not count as messages);
 *   - a fork with UFFD_FEATURE_EVENT_FORK gives the child the parent's
 *     registrations, and its faults start at once: the child is followed from
 *     its birth (sched_process_fork), with the parent's ranges;
 *   - a uffd that reaches a process some other way (over a unix socket with
 *     SCM_RIGHTS, as Firecracker's and CRIU's handlers get theirs; pidfd_getfd)
 *     is learned from its first read (pctop.bpf.c, maybe_reader).
 * Each program returns after one array lookup for processes without uffds. */

/* ---------------------------------------------------------------- close, dup2, dup3 */

static __always_inline int has_uffds(u32 tgid)
{
    u32 slot = tgid & (HINT_SLOTS - 1);
    u32 *h = uffd_tgid_hint.lookup(&slot);
    return h && *h;
}

static __always_inline void fd_gone(s32 fd)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!has_uffds(tgid))
        return;
    if (forget_uffd(tgid, fd)) {
        struct fd_key k = {.tgid = tgid, .fd = fd};
        serves.delete(&k);
        dbg_inc(DBG_UFFD_CLOSED);
    }
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    fd_gone((s32)args->fd);
    return 0;
}

/* dup2/dup3 close newfd first when it is open (a failed call leaves it, but
 * then nothing reads it as a uffd that was not one before) */
TRACEPOINT_PROBE(syscalls, sys_enter_dup2)
{
    if (args->oldfd != args->newfd)
        fd_gone((s32)args->newfd);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_dup3)
{
    fd_gone((s32)args->newfd);
    return 0;
}

/* ---------------------------------------------------------------- fork with EVENT_FORK */

/* Only a process with an EVENT_FORK uffd needs its clones looked at. */
static __always_inline void on_clone(u64 flags)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!has_uffds(tgid) || !is_target(tgid))
        return;
    struct range_set *rs = ranges.lookup(&tgid);
    if (!rs || !rs->event_fork || (flags & CLONE_THREAD))
        return;
    struct inflight io = {.kind = IO_CLONE, .arg = flags, .tgid = tgid, .fd = -1};
    stash_inflight((u32)id, &io);
}

TRACEPOINT_PROBE(syscalls, sys_enter_clone)
{
    on_clone(args->clone_flags);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_clone3)
{
    u64 flags = 0; /* struct clone_args starts with the flags */
    bpf_probe_read_user(&flags, sizeof(flags), (void *)args->uargs);
    on_clone(flags);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_fork)
{
    on_clone(0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_vfork)
{
    on_clone(0);
    return 0;
}

/* In the parent, inside its clone: the child exists and has not run yet. */
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight *io = peek_inflight(tid);
    if (!io || io->kind != IO_CLONE)
        return 0;
    struct inflight done;
    take_inflight(tid, &done);
    u32 child = args->child_pid, parent = done.tgid;
    struct range_set *rs = ranges.lookup(&parent);
    if (!rs)
        return 0;
    ranges.update(&child, rs); /* EVENT_FORK: the child's registrations are the parent's */
    adopt(child, TARGET_CHILD, 1); /* a child is named like its parent until it execs */
    dbg_inc(DBG_FORK_CHILD);
    return 0;
}

/* ---------------------------------------------------------------- exec, for --comm */

/* A process started after pctop whose name is the one asked for is followed from
 * its exec (the name is set by then), not from the next /proc scan: its first
 * faults may come right after. */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    if (!cfg(CFG_FOLLOW_COMM))
        return 0;
    u32 zero = 0;
    struct comm_name *want = comm_filter.lookup(&zero);
    if (!want)
        return 0;
    struct comm_name c = {};
    bpf_get_current_comm(&c.c, sizeof(c.c));
#pragma unroll
    for (int i = 0; i < 16; i++) {
        if (c.c[i] != want->c[i])
            return 0;
        if (!c.c[i])
            break;
    }
    adopt(bpf_get_current_pid_tgid() >> 32, TARGET_GIVEN, 1);
    return 0;
}
