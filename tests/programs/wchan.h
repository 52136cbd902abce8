/* Shared by the test programs in this folder: is a thread of this process
 * asleep in handle_userfault, i.e. waiting for its uffd fault (its wchan)? */
#ifndef PCTOP_TEST_WCHAN_H
#define PCTOP_TEST_WCHAN_H
#include <stdio.h>
#include <string.h>
#include <sys/types.h>

static int asleep_in_uffd(pid_t tid)
{
    char path[64], w[64] = "";
    snprintf(path, sizeof(path), "/proc/self/task/%d/wchan", tid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    if (!fgets(w, sizeof(w), f))
        w[0] = 0;
    fclose(f);
    return strcmp(w, "handle_userfault") == 0;
}
#endif
