/* pctop engine: KVM_RUN timed in native code (the engine's vCPU-exit ground truth).
 *
 * Python reads its clock only after a foreign call returned AND its thread has the
 * GIL again; around KVM_RUN that adds 10-15 us per exit (more on a busy machine).
 * Here the clock is read right before and right after the ioctl, on the vCPU
 * thread, with the GIL released for the whole call (ctypes.CDLL does that), so the
 * span "KVM_RUN returned -> KVM_RUN entered again" is what the kernel sees up to
 * the syscall entry/exit path. Built by pctop/engine/kvm.py on first use.
 */
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <time.h>

#define PCTOP_KVM_RUN 0xAE80

static inline int64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* One KVM_RUN: 0 or the errno. *t_enter / *t_exit: CLOCK_MONOTONIC ns just before
 * the ioctl and just after it returned. */
int pctop_kvm_run(int fd, int64_t *t_enter, int64_t *t_exit)
{
    *t_enter = monotonic_ns();
    int r = ioctl(fd, PCTOP_KVM_RUN, 0);
    int err = r < 0 ? errno : 0;
    *t_exit = monotonic_ns();
    return err;
}

/* The time-stamp counter and CLOCK_MONOTONIC read together (the TSC between two
 * clock reads, the clock as their midpoint): two such pairs some time apart give
 * the TSC frequency that converts the guest's cycle counts to ns. 0 where there is
 * no TSC to read. Returns the clock pair's width (ns), so a caller can retry a
 * pair that an interrupt stretched. */
int64_t pctop_tsc_pair(int64_t *ns, uint64_t *tsc)
{
#if defined(__x86_64__) || defined(__i386__)
    uint32_t lo, hi;
    int64_t a = monotonic_ns();
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    int64_t b = monotonic_ns();
    *tsc = (uint64_t)hi << 32 | lo;
    *ns = a + (b - a) / 2;
    return b - a;
#else
    *tsc = 0;
    *ns = monotonic_ns();
    return 0;
#endif
}
