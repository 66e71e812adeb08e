/* status.c - the thread-local error message behind ds_fail() / ds_last_error(). */
#include "status.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char ds_error_message[512];

ds_status ds_fail(ds_status code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ds_error_message, sizeof ds_error_message, fmt, ap);
    va_end(ap);
    return code;
}

const char *ds_last_error(void) { return ds_error_message; }
