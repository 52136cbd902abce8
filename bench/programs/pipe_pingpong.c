/* Context switches and wake-ups of processes pctop does not follow: two processes
 * pass a byte back and forth through two pipes `n` times; prints the mean ns per
 * round trip (two wake-ups, two switches or more, four syscalls). (bench/host_overhead.py) */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 50000;
    int there[2], back[2];
    char c = 0;
    if (pipe(there) || pipe(back))
        return 1;
    if (fork() == 0) {
        for (int i = 0; i < n; i++)
            if (read(there[0], &c, 1) != 1 || write(back[1], &c, 1) != 1)
                _exit(1);
        _exit(0);
    }
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++)
        if (write(there[1], &c, 1) != 1 || read(back[0], &c, 1) != 1)
            return 1;
    clock_gettime(CLOCK_MONOTONIC, &b);
    wait(0);
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
