/* pctop probes, part 1 of 6: constants and the structs kept in maps.
 * ebpf.py joins the six parts (PROBE_PARTS) into one text for
 * bcc (its rewriter only turns map.lookup() etc. into helper calls in the main
 * file, so the parts cannot #include each other). Struct layouts here are read
 * back by user space through bcc's generated ctypes. */
#ifndef PCTOP_BTF /* built from BTF (pctop/probe_build.py), vmlinux.h already has every kernel type */
#include <uapi/linux/ptrace.h>
#endif

#define HIST_BUCKETS 24
#define MAX_RANGES 64 /* registered ranges tracked per process; more => every fault is a candidate */
#define MAX_MSGS 32   /* uffd_msg records matched per read() (tail-call chain); msgs_read is always exact */
#define HINT_SLOTS 65536 /* per-thread array slots (tid mod HINT_SLOTS), pctop_state.c */
#define TARGET_SLOT_GONE 0x100000000ULL /* a forgotten tgid's slot in target_slots (no tgid is this) */
#define UFFD_FD_SLOTS 16384  /* known-uffd cache (pctop_state.c): the slot of (tgid, fd) is */
#define UFFD_FD_SLOT_SHIFT 6 /* ((tgid << UFFD_FD_SLOT_SHIFT) + fd) mod UFFD_FD_SLOTS */
#define PAGE_MASK_4K (~0xfffULL)
#define UFFD_MSG_SIZE 32
#define UFFD_EVENT_PAGEFAULT 0x12
#define UFFD_EVENT_FORK 0x13 /* arg: the child's new uffd, an fd of the reader's process */
#define UFFD_FEATURE_EVENT_FORK 2
#define CLONE_THREAD 0x10000

/* ioctl numbers (x86-64 encodings; the type byte is (cmd >> 8) & 0xff). */
#define IOC_TYPE_UFFD 0xAA
#define IOC_TYPE_KVM 0xAE
#define USERFAULTFD_IOC_NEW 0xaa00
#define UFFDIO_API 0xc018aa3f
#define UFFDIO_REGISTER 0xc020aa00
#define UFFDIO_UNREGISTER 0x8010aa01
#define UFFDIO_NR_WAKE 0x02
#define UFFDIO_NR_COPY 0x03
#define UFFDIO_NR_ZEROPAGE 0x04
#define UFFDIO_NR_MOVE 0x05
#define UFFDIO_NR_WRITEPROTECT 0x06
#define UFFDIO_NR_CONTINUE 0x07
#define UFFDIO_NR_POISON 0x08
#define UFFDIO_MODE_DONTWAKE 0x1 /* bit 0 of mode in uffdio_copy/zeropage/continue/move/poison */
#define UFFDIO_WP_MODE_WP 0x1    /* uffdio_writeprotect's mode: protect (no wake-up) */
#define UFFDIO_WP_MODE_DONTWAKE 0x2
#define KVM_CREATE_VCPU 0xae41
#define KVM_RUN 0xae80
#define KVM_EXIT_UNKNOWN 0
#define KVM_EXIT_MEMORY_FAULT 39
#define ERR_EFAULT 14
#define ERR_EEXIST 17

/* config array slots, written by user space */
#define CFG_FOLLOW_ALL 0
#define CFG_EPOCH 1
#define CFG_PAGE_MAP 2 /* 1: record which pages each install covered (page_map, page_spans) */
#define CFG_FOLLOW_COMM 3 /* 1: follow a process from its exec when its name is comm_filter's */
#define CFG_SLOTS 4

/* page map: one u64 bitmask per 64 pages (256 KiB) of a uffd's installs */
#define PAGE_MAP_WORD_SHIFT 18
#define PAGE_MAP_MAX_WORDS 16 /* words marked per install (a 2 MiB install spans 8 or 9);
                               * a bigger install is kept whole in page_spans */

/* targets map flags */
#define TARGET_GIVEN 1    /* pid given by the user */
#define TARGET_AUTO 2     /* follow_all: it called userfaultfd()/a uffd or KVM ioctl */
#define TARGET_HANDLER 4  /* it resolved or read a fault of a followed thread (a separate uffd
                           * handler, e.g. one that got the uffd over a unix socket) */
#define TARGET_CHILD 8    /* forked by a followed process whose uffd has EVENT_FORK: its
                           * registrations (and faults) start at birth */

/* per-thread fault phase */
#define PH_NONE 0
#define PH_FAULTED 1  /* candidate fault seen, thread still running */
#define PH_SLEEPING 2 /* it went to sleep after the candidate */
#define PH_WOKEN 3    /* a uffd ioctl woke it; waiting for a CPU */
#define PH_PREEMPTED 4 /* switched out while in the fault, still runnable: preempted
                        * (e.g. by the handler it just woke) between queuing its
                        * uffd message and sleeping; a uffd wake-up makes it a stall */

/* inflight ioctl kinds */
#define IO_UFFD_RESOLVE 1
#define IO_UFFD_REGISTER 2
#define IO_UFFD_UNREGISTER 3
#define IO_UFFD_NEW 4
#define IO_KVM_CREATE_VCPU 5
#define IO_UFFD_READ 6 /* a read() of a uffd: arg = the buffer */
#define IO_CLONE 7     /* clone/clone3/fork/vfork of a process with an EVENT_FORK uffd: arg = flags */
#define IO_MAYBE_UFFD_READ 8 /* a read() of an fd not known as a uffd, by a thread a fault woke */

/* how a vCPU fd's index was learned */
#define HOW_CREATE_VCPU 1 /* saw KVM_CREATE_VCPU return this fd */
#define HOW_VCPU_FD 2     /* seeded by user space from /proc/<pid>/fd (anon_inode:kvm-vcpu:N) */
#define HOW_KVM_EXIT 3    /* kvm:kvm_exit's vcpu_id on the thread (VMX/SVM) */

/* kvm:kvm_exit: isa and the exit reasons of a stage-2 (EPT / NPT) fault */
#define KVM_ISA_VMX 1
#define KVM_ISA_SVM 2
#define VMX_EXIT_EPT_VIOLATION 48
#define SVM_EXIT_NPF 0x400

/* debug counters (dbg array), reported by EbpfSource.debug_counters() */
#define DBG_NOT_UFFD_WAKE 0   /* a candidate's sleep ended by something else than a uffd ioctl */
#define DBG_MISSED_WAKE 1     /* switched in while still "sleeping": wake-up not seen */
#define DBG_MSG_UNMATCHED 2   /* a page-fault message matched no tracked thread */
#define DBG_MSG_BY_PTID 3
#define DBG_MSG_BY_ADDR 4
#define DBG_READ_VIA_COPY 5   /* read matched to a weak fault through the COPY's first page */
#define DBG_EXIT_STALLS 6     /* vCPU-exit mode stalls (EFAULT return -> KVM_RUN again) */
#define DBG_WOKEN_ON_CPU 7    /* a uffd wake-up reached a candidate still on its CPU: a stall */
#define DBG_LOST_SWITCH_IN 8  /* a woken/preempted thread seen running with no switch-in traced */
#define DBG_LOST_SWITCH_OUT 9 /* woken by a uffd ioctl after leaving its CPU untraced */
#define DBG_EARLY_WAKE 10     /* woken on its CPU, then its fault's switch-out: waits for a CPU */
#define DBG_PAGE_MAP_LOST 11  /* installed pages the full page map could not record */
#define DBG_ON_CPU_END 12     /* a stall woken on its CPU that ended there (no switch-out) */
#define DBG_UFFD_CLOSED 13    /* a known uffd's fd closed (or replaced by dup2/dup3) */
#define DBG_NOT_UFFD_READ 14  /* a read() of a "uffd" fd that returned no whole messages: forgotten */
#define DBG_READER_FOUND 15   /* uffds learned from their first read (received from another process) */
#define DBG_FORK_CHILD 16     /* children followed from birth (EVENT_FORK) */
#define DBG_INSTALLED_UNWOKEN 17 /* a read fault's page installed (and woken) before it slept: no wake-up reached it */
#define DBG_UNWOKEN_END 18    /* a read fault seen over with no uffd wake-up or install seen (e.g. a signal ended it) */
#define DBG_SLOTS 19

/* A switch-out this soon after a uffd wake-up that reached the thread on its CPU
 * is the one of that fault (the wake-up overtook its tracepoint, or came before
 * its schedule()); a later one, or any event of the thread first, means the
 * thread went on without leaving the CPU. The kernel's path between the two is
 * a few microseconds; this only bounds how long a misread could stretch a stall. */
#define EARLY_WAKE_WINDOW_NS 100000ULL

struct uffd_range {
    u64 start, end;
};

struct range_set {
    u32 n;        /* slots in use (may contain holes start == end) */
    u32 overflow; /* more than MAX_RANGES registrations: match everything */
    u32 event_fork; /* a uffd of the process asked for UFFD_FEATURE_EVENT_FORK */
    u32 pad;
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
    u64 early_wake_ts; /* a uffd wake-up came while it still looked on CPU */
    u32 tgid;
    u16 cpu;       /* 1 + the CPU it last ran on, 0 = unknown (MAX_CPUS fits) */
    u8 phase;
    u8 reader_known; /* a handler read one of its messages: the uffd's reader is known */
    /* Above: what a fault's every event reads, in the slot's first cache line
     * with its owner. Below: KVM_RUN's, read in vCPU-exit mode or by a sleep
     * outside a fault. */
    u64 efault_ts; /* KVM_RUN returned EFAULT (vCPU-exit mode), waiting for re-entry */
    s32 vcpu;      /* -1 unknown */
    u8 in_run;     /* inside KVM_RUN (a sleep there may be a GUP-path uffd fault) */
    u8 efault_open; /* efault_ts set inside KVM_RUN; its sys_exit moves it to the return */
    u16 pad;
};

/* A thread's state in its tid's array slot (tstate_slots). */
struct tstate_slot {
    u64 owner; /* tid holding the slot, 0 = free */
    struct tstate t;
    u64 pad[6]; /* to two whole lines (LINE_ARRAY) */
};
_Static_assert(sizeof(struct tstate_slot) == 128, "tstate_slot: two cache lines");

/* The threads that faulted on a page, oldest first (the kernel hands out a
 * uffd's messages oldest first), for messages without a thread id. */
#define PENDING_TIDS 4
struct pending_fault {
    u64 page;
    u32 tid[PENDING_TIDS];
    u32 tgid;
    u32 pad;
};
#define PENDING_SLOTS 65536 /* direct-mapped by page number */

struct page_time {
    u64 page;
    u64 ts;
};

/* The syscall a thread is in, from its enter to its exit tracepoint: a uffd/KVM
 * ioctl or a uffd read() (a thread is in one syscall at a time). */
struct inflight {
    u64 start;   /* range of a uffd ioctl (user address) */
    u64 len;
    u64 arg;     /* the ioctl's argument; read(): the buffer */
    u64 read_ts; /* read time of a message for the first page of the range (weak matching) */
    u32 cmd;
    s32 fd;
    u32 kind;
    u32 tgid;
    u32 followed; /* tgid was a target at entry (saves a targets lookup per event after) */
    u16 range_read; /* IO_UFFD_RESOLVE: start/len/read_ts/wakes filled in (resolve_range) */
    u16 wakes;      /* ...and it wakes the range's waiters (no DONTWAKE mode) */
};

/* A thread's in-flight syscall in its tid's array slot; owner = the tid holding
 * the slot, 0 = free (64-bit for the BPF compare-and-swap). */
struct inflight_slot {
    u64 owner;
    struct inflight io;
};
_Static_assert(sizeof(struct inflight_slot) == 64, "inflight_slot: one cache line");

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
    u64 page_map_lost; /* installed pages missing from the page map (map full) */
};

/* page_map: bit (page >> 12) & 63 of `bits` is set when that page was installed */
struct pm_key {
    u32 tgid;
    s32 fd;
    u32 epoch;
    u32 pad;
    u64 word; /* page address >> PAGE_MAP_WORD_SHIFT */
};

/* page_spans: installs too big for the bitmask loop, value = bytes */
struct span_key {
    u32 tgid;
    s32 fd;
    u32 epoch;
    u32 pad;
    u64 start;
};

struct comm_name {
    char c[16];
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
