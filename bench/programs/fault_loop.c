/* Page faults of a process pctop does not follow: map 64 MiB, touch every page,
 * unmap, `rounds` times; prints the mean ns per fault. (bench/host_overhead.py) */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

int main(int argc, char **argv)
{
    size_t size = 64 << 20;
    int rounds = argc > 1 ? atoi(argv[1]) : 6;
    long faults = 0;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int r = 0; r < rounds; r++) {
        volatile char *p = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return 1;
        for (size_t i = 0; i < size; i += 4096, faults++)
            p[i] = 1;
        munmap((void *)p, size);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / faults);
    return 0;
}
