/* uffd_scenarios: userfaultfd users shaped like the programs pctop must be
 * exact for besides its own engine; each prints one JSON object of its own
 * counts, the ground truth for tests/system/test_uffd_users.py.
 *
 *   fork [-p N]     a process with UFFD_FEATURE_EVENT_FORK forks; the child
 *                   touches N pages of the inherited registration at once and
 *                   exits. The parent's handler thread reads the fork event
 *                   (which makes the child's uffd, inside its read()) and
 *                   resolves the child's faults through that uffd, as CRIU's
 *                   lazy-pages and uffd stress tests do.
 *   scm [-t T] [-p N]  the faulting process creates the uffd and sends it over
 *                   a unix socket (SCM_RIGHTS) to a handler process forked
 *                   before the uffd existed, which reads and copies, as
 *                   Firecracker's external handlers and CRIU's daemon do.
 *                   T threads of the faulting process touch N pages each.
 *   reuse [-p N]    a uffd is closed and its fd number reused at once by
 *                   /dev/zero (close + open, then dup2 over a second uffd);
 *                   N reads of 64 bytes each from the reused numbers.
 *   samepage [-t T] [-p N]  T threads fault on the same page, one after the
 *                   other (each is asleep in handle_userfault before the next
 *                   touches); the handler then reads ONE message (the oldest:
 *                   thread 0's) and copies the page, which wakes all T. So per
 *                   page thread 0's fault is read, the others' never are.
 *   signal [-p N]   one thread touches N pages; for each, the handler reads the
 *                   message, waits until the thread sleeps in handle_userfault
 *                   and sends it a signal, which takes it out of the fault: its
 *                   handler returns and the touch faults again, a second
 *                   message, which the handler reads and resolves. As QEMU's
 *                   kicks (SIG_IPI) do to a vCPU thread in a fault. So 2N
 *                   faults, each a wait for the handler.
 * -i asks for UFFD_FEATURE_THREAD_ID (default off: matching by address).
 * -w prints "ready <pid>" when set up and waits for a line on stdin.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "wchan.h"

#define PAGE 4096UL
#define MAX_THREADS 16

static int n_threads = 3, n_pages = 64, thread_id = 0, wait_go = 0;
static char src_page[PAGE] __attribute__((aligned(4096)));

static void die(const char *what)
{
    fprintf(stderr, "uffd_scenarios: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int new_uffd(unsigned long long features)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API, .features = features | (thread_id ? UFFD_FEATURE_THREAD_ID : 0)};
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        die("UFFDIO_API");
    return fd;
}

static char *registered_region(int uffd, size_t len)
{
    char *r = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r == MAP_FAILED)
        die("mmap");
    struct uffdio_register reg = {.range = {.start = (unsigned long)r, .len = len},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        die("UFFDIO_REGISTER");
    return r;
}

static void copy_page(int uffd, unsigned long addr)
{
    struct uffdio_copy c = {.dst = addr & ~(PAGE - 1), .src = (unsigned long)src_page, .len = PAGE};
    if (ioctl(uffd, UFFDIO_COPY, &c) < 0 && errno != EEXIST)
        die("UFFDIO_COPY");
}

static void ready(void)
{
    if (!wait_go)
        return;
    printf("ready %d\n", getpid());
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof(line), stdin))
        exit(1);
}

static int wait_readable(int fd, int ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, ms) > 0;
}

/* ---------------------------------------------------------------- fork */

static struct {
    int uffd, child_uffd;
    long fork_events, child_reads, child_msgs, child_copies;
} fk;

static void *fork_handler(void *arg)
{
    (void)arg;
    struct uffd_msg m;
    long done = 0;
    while (done < n_pages) {
        struct pollfd p[2] = {{.fd = fk.uffd, .events = POLLIN}, {.fd = fk.child_uffd, .events = POLLIN}};
        if (poll(p, fk.child_uffd >= 0 ? 2 : 1, 5000) <= 0)
            break;
        if (p[0].revents & POLLIN && read(fk.uffd, &m, sizeof(m)) == sizeof(m) && m.event == UFFD_EVENT_FORK) {
            fk.fork_events++;
            fk.child_uffd = (int)m.arg.fork.ufd;
        }
        if (fk.child_uffd >= 0 && p[1].revents & POLLIN) {
            ssize_t r = read(fk.child_uffd, &m, sizeof(m));
            fk.child_reads++;
            if (r == sizeof(m) && m.event == UFFD_EVENT_PAGEFAULT) {
                fk.child_msgs++;
                copy_page(fk.child_uffd, m.arg.pagefault.address);
                fk.child_copies++;
                done++;
            }
        }
    }
    return NULL;
}

static int run_fork(void)
{
    fk.uffd = new_uffd(UFFD_FEATURE_EVENT_FORK);
    fk.child_uffd = -1;
    size_t len = (size_t)n_pages * PAGE;
    volatile char *region = registered_region(fk.uffd, len);
    ready();
    pthread_t h;
    if (pthread_create(&h, NULL, fork_handler, NULL))
        die("pthread_create");
    pid_t child = fork(); /* returns once the handler has read the fork event */
    if (child < 0)
        die("fork");
    if (child == 0) {
        for (int i = 0; i < n_pages; i++)
            (void)region[(size_t)i * PAGE];
        _exit(0);
    }
    int status = 0;
    waitpid(child, &status, 0);
    pthread_join(h, NULL);
    printf("{\"pid\": %d, \"child\": %d, \"child_ok\": %d, \"uffd\": %d, \"child_uffd\": %d, "
           "\"fork_events\": %ld, \"child_reads\": %ld, \"child_msgs\": %ld, \"child_copies\": %ld}\n",
           getpid(), child, WIFEXITED(status) && WEXITSTATUS(status) == 0, fk.uffd, fk.child_uffd,
           fk.fork_events, fk.child_reads, fk.child_msgs, fk.child_copies);
    return 0;
}

/* ---------------------------------------------------------------- scm */

struct scm_shared {
    volatile int handler_uffd;
    unsigned long base; /* the faulting process's region, to tell which thread faulted */
    long reads, msgs, copies;
    long faults[MAX_THREADS];
};

static int recv_fd(int sock)
{
    char byte;
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } c;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = c.buf, .msg_controllen = sizeof(c.buf)};
    if (recvmsg(sock, &msg, 0) != 1)
        die("recvmsg");
    struct cmsghdr *h = CMSG_FIRSTHDR(&msg);
    if (!h || h->cmsg_type != SCM_RIGHTS)
        die("no fd received");
    int fd;
    memcpy(&fd, CMSG_DATA(h), sizeof(fd));
    return fd;
}

static void send_fd(int sock, int fd)
{
    char byte = 'u';
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } c;
    memset(&c, 0, sizeof(c));
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = c.buf, .msg_controllen = sizeof(c.buf)};
    struct cmsghdr *h = CMSG_FIRSTHDR(&msg);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(h), &fd, sizeof(fd));
    if (sendmsg(sock, &msg, 0) != 1)
        die("sendmsg");
}

static char *scm_region;
static volatile int scm_go;
static volatile pid_t scm_tid[MAX_THREADS];

static void *scm_toucher(void *arg)
{
    long k = (long)arg;
    scm_tid[k] = (pid_t)syscall(SYS_gettid);
    while (!scm_go)
        usleep(100);
    volatile char *base = scm_region + (size_t)k * n_pages * PAGE;
    for (int i = 0; i < n_pages; i++)
        (void)base[(size_t)i * PAGE];
    return NULL;
}

static int run_scm(void)
{
    struct scm_shared *sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED)
        die("mmap shared");
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        die("socketpair");
    long expected = (long)n_threads * n_pages;
    pid_t handler = fork(); /* before the uffd exists: the handler only gets it over the socket */
    if (handler < 0)
        die("fork");
    if (handler == 0) {
        close(sv[0]);
        int uffd = recv_fd(sv[1]);
        sh->handler_uffd = uffd;
        struct uffd_msg m;
        long done = 0;
        while (done < expected && wait_readable(uffd, 5000)) {
            ssize_t r = read(uffd, &m, sizeof(m)); /* the first read comes before any ioctl here */
            sh->reads++;
            if (r != sizeof(m) || m.event != UFFD_EVENT_PAGEFAULT)
                continue;
            sh->msgs++;
            copy_page(uffd, m.arg.pagefault.address);
            sh->copies++;
            done++;
            size_t off = (m.arg.pagefault.address & ~(PAGE - 1)) - sh->base;
            long k = (long)(off / (n_pages * PAGE));
            if (k >= 0 && k < n_threads)
                sh->faults[k]++;
        }
        _exit(0);
    }
    close(sv[1]);
    int uffd = new_uffd(0);
    size_t len = (size_t)n_threads * n_pages * PAGE;
    scm_region = registered_region(uffd, len);
    sh->base = (unsigned long)scm_region;
    pthread_t th[MAX_THREADS];
    for (long k = 0; k < n_threads; k++)
        if (pthread_create(&th[k], NULL, scm_toucher, (void *)k))
            die("pthread_create");
    for (int k = 0; k < n_threads; k++)
        while (!scm_tid[k])
            usleep(100);
    ready();
    send_fd(sv[0], uffd);
    while (!sh->handler_uffd)
        usleep(100);
    scm_go = 1;
    for (int k = 0; k < n_threads; k++)
        pthread_join(th[k], NULL);
    waitpid(handler, NULL, 0);
    printf("{\"pid\": %d, \"handler_pid\": %d, \"uffd\": %d, \"handler_uffd\": %d, \"reads\": %ld, "
           "\"msgs\": %ld, \"copies\": %ld, \"touchers\": [", getpid(), handler, uffd, sh->handler_uffd,
           sh->reads, sh->msgs, sh->copies);
    for (int k = 0; k < n_threads; k++)
        printf("%s{\"tid\": %d, \"faults\": %ld}", k ? ", " : "", scm_tid[k], sh->faults[k]);
    printf("]}\n");
    return 0;
}

/* ---------------------------------------------------------------- reuse */

static int run_reuse(void)
{
    char buf[64];
    int first = new_uffd(0);
    ready();
    close(first);
    int zero = open("/dev/zero", O_RDONLY | O_CLOEXEC); /* the lowest free number: first's */
    if (zero != first)
        die("fd number not reused");
    long reads = 0;
    for (int i = 0; i < n_pages; i++)
        reads += read(zero, buf, sizeof(buf)) == sizeof(buf);
    int second = new_uffd(0);
    if (dup2(zero, second) < 0) /* closes the second uffd, its number now /dev/zero */
        die("dup2");
    for (int i = 0; i < n_pages; i++)
        reads += read(second, buf, sizeof(buf)) == sizeof(buf);
    printf("{\"pid\": %d, \"reused\": [%d, %d], \"reads\": %ld}\n", getpid(), first, second, reads);
    return 0;
}

/* ---------------------------------------------------------------- samepage */

static char *sp_region;
static volatile int sp_turn[MAX_THREADS];  /* page index the thread may touch next */
static volatile int sp_done[MAX_THREADS];  /* pages it has finished */
static volatile pid_t sp_tid[MAX_THREADS];

static void *sp_thread(void *arg)
{
    long k = (long)arg;
    sp_tid[k] = (pid_t)syscall(SYS_gettid);
    for (int i = 0; i < n_pages; i++) {
        while (sp_turn[k] < i + 1)
            usleep(20);
        (void)((volatile char *)sp_region)[(size_t)i * PAGE];
        sp_done[k] = i + 1;
    }
    return NULL;
}

static int run_samepage(void)
{
    int uffd = new_uffd(0);
    sp_region = registered_region(uffd, (size_t)n_pages * PAGE);
    pthread_t th[MAX_THREADS];
    for (long k = 0; k < n_threads; k++)
        if (pthread_create(&th[k], NULL, sp_thread, (void *)k))
            die("pthread_create");
    for (int k = 0; k < n_threads; k++)
        while (!sp_tid[k])
            usleep(100);
    ready();
    long reads = 0, msgs = 0, first_ok = 0;
    for (int i = 0; i < n_pages; i++) {
        for (int k = 0; k < n_threads; k++) {
            sp_turn[k] = i + 1;
            while (!asleep_in_uffd(sp_tid[k]))
                usleep(20);
        }
        struct uffd_msg m;
        if (!wait_readable(uffd, 2000) || read(uffd, &m, sizeof(m)) != sizeof(m))
            die("read");
        reads++;
        msgs++;
        if (!thread_id || m.arg.pagefault.feat.ptid == (unsigned)sp_tid[0])
            first_ok++;
        copy_page(uffd, m.arg.pagefault.address);
        for (int k = 0; k < n_threads; k++)
            while (sp_done[k] < i + 1)
                usleep(20);
    }
    for (int k = 0; k < n_threads; k++)
        pthread_join(th[k], NULL);
    /* nothing is left to read: the copy woke the unread faults with the read one */
    struct uffd_msg m;
    long leftover = read(uffd, &m, sizeof(m)) > 0;
    printf("{\"pid\": %d, \"uffd\": %d, \"reads\": %ld, \"msgs\": %ld, \"first_read\": %ld, \"leftover\": %ld, "
           "\"tids\": [", getpid(), uffd, reads, msgs, first_ok, leftover);
    for (int k = 0; k < n_threads; k++)
        printf("%s%d", k ? ", " : "", sp_tid[k]);
    printf("]}\n");
    return 0;
}

/* ---------------------------------------------------------------- signal */

static char *sg_region;
static volatile pid_t sg_tid;
static volatile int sg_go;
static volatile long sg_signals; /* handled by the toucher */

static void sg_on_signal(int sig)
{
    (void)sig;
    sg_signals++;
}

static void *sg_toucher(void *arg)
{
    (void)arg;
    sg_tid = (pid_t)syscall(SYS_gettid);
    while (!sg_go)
        usleep(100);
    for (int i = 0; i < n_pages; i++)
        (void)((volatile char *)sg_region)[(size_t)i * PAGE];
    return NULL;
}

static void sg_read(int uffd, struct uffd_msg *m)
{
    if (!wait_readable(uffd, 5000) || read(uffd, m, sizeof(*m)) != sizeof(*m) || m->event != UFFD_EVENT_PAGEFAULT)
        die("read");
}

static int run_signal(void)
{
    struct sigaction sa = {.sa_handler = sg_on_signal}; /* no SA_RESTART: a fault is not a syscall anyway */
    if (sigaction(SIGUSR1, &sa, NULL) < 0)
        die("sigaction");
    int uffd = new_uffd(0);
    sg_region = registered_region(uffd, (size_t)n_pages * PAGE);
    pthread_t th;
    if (pthread_create(&th, NULL, sg_toucher, NULL))
        die("pthread_create");
    while (!sg_tid)
        usleep(100);
    ready();
    sg_go = 1;
    long msgs = 0, same = 0;
    for (int i = 0; i < n_pages; i++) {
        struct uffd_msg m1, m2;
        sg_read(uffd, &m1);
        while (!asleep_in_uffd(sg_tid))
            usleep(20);
        long before = sg_signals;
        if (pthread_kill(th, SIGUSR1))
            die("pthread_kill");
        sg_read(uffd, &m2); /* the same touch, faulting again after its signal handler */
        msgs += 2;
        same += m1.arg.pagefault.address == m2.arg.pagefault.address && sg_signals == before + 1;
        copy_page(uffd, m2.arg.pagefault.address);
    }
    pthread_join(th, NULL);
    printf("{\"pid\": %d, \"tid\": %d, \"uffd\": %d, \"msgs\": %ld, \"signals\": %ld, \"same_page\": %ld}\n",
           getpid(), sg_tid, uffd, msgs, sg_signals, same);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s fork|scm|reuse|samepage|signal [-t threads] [-p pages] [-i] [-w]\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    int opt;
    optind = 2;
    while ((opt = getopt(argc, argv, "t:p:iw")) != -1) {
        switch (opt) {
        case 't': n_threads = atoi(optarg); break;
        case 'p': n_pages = atoi(optarg); break;
        case 'i': thread_id = 1; break;
        case 'w': wait_go = 1; break;
        default: return 2;
        }
    }
    if (n_threads < 1 || n_threads > MAX_THREADS || n_pages < 1) {
        fprintf(stderr, "uffd_scenarios: bad arguments\n");
        return 2;
    }
    memset(src_page, 0x5a, PAGE);
    if (!strcmp(mode, "fork"))
        return run_fork();
    if (!strcmp(mode, "scm"))
        return run_scm();
    if (!strcmp(mode, "reuse"))
        return run_reuse();
    if (!strcmp(mode, "samepage"))
        return run_samepage();
    if (!strcmp(mode, "signal"))
        return run_signal();
    fprintf(stderr, "uffd_scenarios: unknown mode %s\n", mode);
    return 2;
}
