/* check.h - the C tests' CHECK(cond, fmt, ...): counts and reports a failed condition and goes on,
 * so one run lists every failure; main() returns non-zero when check_failures > 0. */
#ifndef DS_TEST_CHECK_H
#define DS_TEST_CHECK_H

#include <stdio.h>

static int check_failures;

#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (!(cond)) {                                           \
            check_failures++;                                    \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                        \
            fprintf(stderr, "\n");                               \
        }                                                        \
    } while (0)

#endif
