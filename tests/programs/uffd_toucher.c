/* uffd_toucher: a small userfaultfd user whose own counts are the ground
 * truth for pctop's probes (tests/system/test_ebpf.py compiles it with gcc).
 *
 * T toucher threads each touch M pages of their own slice of one
 * uffd-registered anonymous region, in order, once. Faults are resolved by
 *   -m read   : a handler thread read()s the uffd (up to -b messages per
 *               call), waits -d us, then UFFDIO_COPYs the page;
 *   -m stream : nobody reads; a "stream" thread COPYs each toucher's next
 *               page once /proc shows the toucher asleep in handle_userfault
 *               (the background stream winning before any read).
 * -P K copies the first K pages of every slice before the touchers start
 * (those touches must not fault). -i asks for UFFD_FEATURE_THREAD_ID,
 * -D creates the uffd through /dev/userfaultfd (USERFAULTFD_IOC_NEW).
 * -w prints "ready <pid>" after registering and waits for a line on stdin.
 * -f runs the read handler in a forked child process (it inherits the uffd;
 * its COPYs go to the parent's memory), as Firecracker's handler is a
 * separate process; counts are shared through a MAP_SHARED page.
 * -S makes the read handler spin on its non-blocking uffd (read() until it
 * returns a message, no poll()): it takes a message the moment it is queued,
 * often before the faulting thread has left its CPU, so the wake-up reaches a
 * thread that is still on it (the probes must count that stall too).
 * -M makes the faults minor ones: the region is a shared memfd whose pages
 * are all in the page cache (written through a second mapping) but not
 * mapped in the registered one (UFFDIO_REGISTER_MODE_MINOR), and each is
 * resolved with UFFDIO_CONTINUE instead of UFFDIO_COPY (as a VMM does with
 * shared guest memory, and KVM's demand_paging_test -u MINOR).
 *
 * At the end it prints one JSON object with, per toucher, the faults the
 * handler resolved for it, the summed service time (read return to COPY
 * return) of those faults and the summed time its touches took.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "wchan.h"

#define MAX_TOUCHERS 64
#define PAGE 4096UL

static int n_touchers = 2, n_pages = 64, delay_us = 0, batch = 1, prefill = 0;
static int want_thread_id = 0, use_dev = 0, wait_go = 0, stream_mode = 0, fork_handler = 0, minor_mode = 0;
static int spin_handler = 0;
static int uffd;
static char *region;
static char *src_page;
struct toucher {
    pthread_t th;
    int idx;
    volatile pid_t tid;
    volatile int next_page; /* the page it touches next (stream mode watches it) */
    long faults;            /* resolved for it by the handler/stream */
    long long service_ns;
    long long touch_ns;
};
/* shared with a forked handler (-f) */
static struct shared {
    volatile int started;
    long reads, msgs, copies;
    struct toucher t[MAX_TOUCHERS];
} *sh;
#define touchers (sh->t)

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "uffd_toucher: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* Install (COPY) or map (CONTINUE, -M) one page; "copies" counts either. */
static int resolve_page(unsigned long addr)
{
    if (minor_mode) {
        struct uffdio_continue c = {.range = {.start = addr, .len = PAGE}, .mode = 0};
        if (ioctl(uffd, UFFDIO_CONTINUE, &c) < 0 && errno != EEXIST)
            die("UFFDIO_CONTINUE");
    } else {
        struct uffdio_copy c = {.dst = addr, .src = (unsigned long)src_page, .len = PAGE, .mode = 0};
        if (ioctl(uffd, UFFDIO_COPY, &c) < 0 && errno != EEXIST)
            die("UFFDIO_COPY");
    }
    sh->copies++;
    return 0;
}

static void *toucher_main(void *arg)
{
    struct toucher *t = arg;
    t->tid = (pid_t)syscall(SYS_gettid);
    while (!sh->started)
        usleep(100);
    volatile char *base = region + (size_t)t->idx * n_pages * PAGE;
    for (int i = 0; i < n_pages; i++) {
        t->next_page = i;
        long long t0 = now_ns();
        (void)base[(size_t)i * PAGE]; /* the fault */
        t->touch_ns += now_ns() - t0;
    }
    t->next_page = n_pages;
    return NULL;
}

static struct toucher *owner_of(unsigned long addr)
{
    size_t off = addr - (unsigned long)region;
    int idx = (int)(off / (n_pages * PAGE));
    return idx >= 0 && idx < n_touchers ? &touchers[idx] : NULL;
}

/* read mode: read messages, delay, COPY each; counts come from the messages */
static void *handler_main(void *arg)
{
    (void)arg;
    long expected = (long)n_touchers * (n_pages - prefill);
    struct uffd_msg buf[64];
    long done = 0;
    while (!sh->started)
        usleep(100);
    long long idle_since = now_ns();
    while (done < expected) {
        if (!spin_handler) {
            struct pollfd p = {.fd = uffd, .events = POLLIN};
            if (poll(&p, 1, 2000) <= 0)
                break; /* nothing for 2 s: give up, the JSON shows it */
        } else if (now_ns() - idle_since > 2000000000LL) {
            break;
        }
        ssize_t r = read(uffd, buf, sizeof(buf[0]) * batch);
        sh->reads++;
        if (r < 0) {
            if (errno == EAGAIN)
                continue;
            die("read");
        }
        idle_since = now_ns();
        long long t_read = now_ns();
        int n = (int)(r / sizeof(buf[0]));
        sh->msgs += n;
        for (int i = 0; i < n; i++) {
            if (buf[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            unsigned long addr = buf[i].arg.pagefault.address & ~(PAGE - 1);
            if (delay_us)
                usleep(delay_us);
            resolve_page(addr);
            struct toucher *t = owner_of(addr);
            if (t) {
                t->faults++;
                t->service_ns += now_ns() - t_read;
            }
            done++;
        }
    }
    return NULL;
}

/* stream mode: never read; COPY the page a toucher sleeps on */
static void *stream_main(void *arg)
{
    (void)arg;
    for (int i = prefill; i < n_pages; i++) {
        for (int k = 0; k < n_touchers; k++) {
            struct toucher *t = &touchers[k];
            long long deadline = now_ns() + 2000000000LL;
            while (!(t->next_page == i && asleep_in_uffd(t->tid))) {
                if (now_ns() > deadline)
                    return NULL; /* stuck: the JSON shows fewer faults */
                usleep(50);
            }
            unsigned long addr = (unsigned long)region + ((size_t)k * n_pages + i) * PAGE;
            long long t0 = now_ns();
            resolve_page(addr);
            t->faults++;
            t->service_ns += now_ns() - t0;
        }
    }
    return NULL;
}

static int open_uffd(void)
{
    int flags = O_CLOEXEC | O_NONBLOCK;
    if (!use_dev) {
        int fd = (int)syscall(SYS_userfaultfd, flags);
        if (fd >= 0)
            return fd;
    }
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        die("open /dev/userfaultfd");
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    if (fd < 0)
        die("USERFAULTFD_IOC_NEW");
    close(dev);
    return fd;
}

int main(int argc, char **argv)
{
    int opt;
    while ((opt = getopt(argc, argv, "t:p:d:b:P:m:iDwfMS")) != -1) {
        switch (opt) {
        case 't': n_touchers = atoi(optarg); break;
        case 'p': n_pages = atoi(optarg); break;
        case 'd': delay_us = atoi(optarg); break;
        case 'b': batch = atoi(optarg); break;
        case 'P': prefill = atoi(optarg); break;
        case 'm': stream_mode = strcmp(optarg, "stream") == 0; break;
        case 'i': want_thread_id = 1; break;
        case 'D': use_dev = 1; break;
        case 'w': wait_go = 1; break;
        case 'f': fork_handler = 1; break;
        case 'M': minor_mode = 1; break;
        case 'S': spin_handler = 1; break;
        default:
            fprintf(stderr, "usage: %s [-t touchers] [-p pages] [-d delay_us] [-b batch] "
                            "[-P prefill] [-m read|stream] [-i] [-D] [-w] [-f] [-M] [-S]\n", argv[0]);
            return 2;
        }
    }
    if (n_touchers < 1 || n_touchers > MAX_TOUCHERS || n_pages < 1 || batch < 1 || batch > 64 ||
        prefill < 0 || prefill > n_pages || (fork_handler && stream_mode)) {
        fprintf(stderr, "uffd_toucher: bad arguments\n");
        return 2;
    }
    sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED)
        die("mmap shared");
    size_t len = (size_t)n_touchers * n_pages * PAGE;
    if (minor_mode) {
        int memfd = memfd_create("uffd_toucher", MFD_CLOEXEC);
        if (memfd < 0 || ftruncate(memfd, (off_t)len) < 0)
            die("memfd");
        region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
        char *alias = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
        if (region == MAP_FAILED || alias == MAP_FAILED)
            die("mmap memfd");
        memset(alias, 0x5a, len); /* every page in the page cache, none mapped in region */
    } else {
        region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    src_page = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED || src_page == MAP_FAILED)
        die("mmap");
    memset(src_page, 0x5a, PAGE);

    uffd = open_uffd();
    struct uffdio_api api = {.api = UFFD_API, .features = (want_thread_id ? UFFD_FEATURE_THREAD_ID : 0) |
                                                          (minor_mode ? UFFD_FEATURE_MINOR_SHMEM : 0)};
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        die("UFFDIO_API");
    struct uffdio_register reg = {.range = {.start = (unsigned long)region, .len = len},
                                  .mode = minor_mode ? UFFDIO_REGISTER_MODE_MINOR
                                                     : UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        die("UFFDIO_REGISTER");

    pid_t handler_pid = 0;
    if (fork_handler) { /* before any thread exists: the child is a clean copy */
        handler_pid = fork();
        if (handler_pid < 0)
            die("fork");
        if (handler_pid == 0) {
            handler_main(NULL);
            _exit(0);
        }
    }
    for (int k = 0; k < n_touchers; k++) {
        touchers[k].idx = k;
        if (pthread_create(&touchers[k].th, NULL, toucher_main, &touchers[k]))
            die("pthread_create");
    }
    for (int k = 0; k < n_touchers; k++)
        while (!touchers[k].tid)
            usleep(100);
    for (int k = 0; k < n_touchers; k++)
        for (int i = 0; i < prefill; i++)
            resolve_page((unsigned long)region + ((size_t)k * n_pages + i) * PAGE);
    sh->copies = 0; /* prefill copies are not fault resolutions */

    if (wait_go) {
        printf("ready %d\n", getpid());
        fflush(stdout);
        char line[16];
        if (!fgets(line, sizeof(line), stdin))
            return 1;
    }
    pthread_t helper;
    if (!fork_handler && pthread_create(&helper, NULL, stream_mode ? stream_main : handler_main, NULL))
        die("pthread_create");
    long long t0 = now_ns();
    sh->started = 1;
    for (int k = 0; k < n_touchers; k++)
        pthread_join(touchers[k].th, NULL);
    long long wall = now_ns() - t0;
    if (fork_handler)
        waitpid(handler_pid, NULL, 0);
    else
        pthread_join(helper, NULL);

    printf("{\"pid\": %d, \"handler_pid\": %d, \"uffd\": %d, \"reads\": %ld, \"msgs\": %ld, "
           "\"copies\": %ld, \"wall_ns\": %lld, \"touchers\": [", getpid(),
           fork_handler ? handler_pid : getpid(), uffd, sh->reads, sh->msgs, sh->copies, wall);
    for (int k = 0; k < n_touchers; k++)
        printf("%s{\"tid\": %d, \"faults\": %ld, \"service_ns\": %lld, \"touch_ns\": %lld}",
               k ? ", " : "", touchers[k].tid, touchers[k].faults, touchers[k].service_ns,
               touchers[k].touch_ns);
    printf("]}\n");
    return 0;
}
