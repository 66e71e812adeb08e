/* safetensors.h - a strict reader for the safetensors format (float32 tensors only).
 * Every malformation (bad header, wrong dtype, out-of-range or overlapping offsets, truncated
 * data) is a DS_ERR_FORMAT status with a message naming the tensor and what was expected. */
#ifndef DS_SAFETENSORS_H
#define DS_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>
#include "status.h"

#define ST_MAX_NAME 128
#define ST_MAX_DIMS 8

typedef struct {
    char name[ST_MAX_NAME];
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const uint8_t *data; /* little-endian float32 values inside st_file.bytes, possibly unaligned: memcpy them */
    size_t count;       /* number of float32 values */
} st_tensor;

typedef struct {
    uint8_t *bytes;  /* the whole file */
    size_t nbytes;
    st_tensor *tensors;
    int ntensors;
} st_file;

ds_status ds_st_parse(st_file *file, uint8_t *bytes, size_t nbytes); /* takes ownership of bytes */
ds_status ds_st_read(st_file *file, const char *path);
const st_tensor *ds_st_find(const st_file *file, const char *name);
void ds_st_free(st_file *file);

#endif
