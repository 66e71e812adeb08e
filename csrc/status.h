/* status.h - status codes and the thread-local error message shared by every C file.
 * C functions never exit or abort: they return a ds_status and leave a human-readable
 * message in ds_last_error(), which the Python binding turns into an exception. */
#ifndef DS_STATUS_H
#define DS_STATUS_H

typedef enum {
    DS_OK = 0,
    DS_ERR_IO,       /* a file could not be read */
    DS_ERR_FORMAT,   /* a file is malformed, truncated or does not match the model */
    DS_ERR_VALUE,    /* an argument is out of range or of the wrong shape */
    DS_ERR_NOMEM,    /* an allocation failed */
    DS_ERR_BACKEND,  /* the compute backend (oneDNN, CUDA) refused or failed */
    DS_ERR_CANCELLED /* the caller asked to stop */
} ds_status;

/* printf-style; always returns `code` so callers can `return ds_fail(DS_ERR_VALUE, ...)`. */
ds_status ds_fail(ds_status code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *ds_last_error(void);

#define DS_TRY(expr)                    \
    do {                                \
        ds_status ds_try_rc_ = (expr);  \
        if (ds_try_rc_ != DS_OK)        \
            return ds_try_rc_;          \
    } while (0)

#endif
