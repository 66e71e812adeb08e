/* safetensors.c - strict safetensors reader: an 8-byte little-endian header length, a JSON
 * header {"name": {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}, then the data.
 * The JSON parser knows exactly this schema and rejects anything else, so a corrupt or
 * foreign file fails with a message instead of being half-read. */
#include "safetensors.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ST_MAX_HEADER (100u << 20)

typedef struct {
    const char *p, *end;
} json_cursor;

static void skip_ws(json_cursor *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t'))
        c->p++;
}

static int expect_char(json_cursor *c, char ch)
{
    skip_ws(c);
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        return 1;
    }
    return 0;
}

/* Reads a JSON string into out (escapes kept verbatim except \" and \\); 0 on error/overflow. */
static int parse_string(json_cursor *c, char *out, size_t cap)
{
    size_t n = 0;
    if (!expect_char(c, '"'))
        return 0;
    while (c->p < c->end && *c->p != '"') {
        char ch = *c->p++;
        if (ch == '\\') {
            if (c->p >= c->end)
                return 0;
            ch = *c->p++;
        } else if ((unsigned char)ch < 0x20) {
            return 0;
        }
        if (out) {
            if (n + 1 >= cap)
                return 0;
            out[n++] = ch;
        }
    }
    if (c->p >= c->end)
        return 0;
    c->p++;
    if (out)
        out[n] = 0;
    return 1;
}

static int parse_uint(json_cursor *c, uint64_t *value)
{
    uint64_t v = 0;
    int digits = 0;
    skip_ws(c);
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
        if (v > (UINT64_MAX - 9) / 10)
            return 0;
        v = v * 10 + (uint64_t)(*c->p++ - '0');
        digits++;
    }
    *value = v;
    return digits > 0;
}

/* [u, u, ...] with at most `cap` entries. */
static int parse_uint_array(json_cursor *c, uint64_t *values, int cap, int *count)
{
    *count = 0;
    if (!expect_char(c, '['))
        return 0;
    if (expect_char(c, ']'))
        return 1;
    do {
        if (*count >= cap || !parse_uint(c, &values[*count]))
            return 0;
        (*count)++;
    } while (expect_char(c, ','));
    return expect_char(c, ']');
}

static ds_status parse_metadata(json_cursor *c)
{
    if (!expect_char(c, '{'))
        return ds_fail(DS_ERR_FORMAT, "safetensors: __metadata__ must be an object of strings");
    if (expect_char(c, '}'))
        return DS_OK;
    do {
        if (!parse_string(c, NULL, 0) || !expect_char(c, ':') || !parse_string(c, NULL, 0))
            return ds_fail(DS_ERR_FORMAT, "safetensors: __metadata__ must be an object of strings");
    } while (expect_char(c, ','));
    if (!expect_char(c, '}'))
        return ds_fail(DS_ERR_FORMAT, "safetensors: unterminated __metadata__ object");
    return DS_OK;
}

static ds_status parse_tensor_entry(json_cursor *c, st_tensor *t, uint64_t offsets[2])
{
    char key[32], dtype[16] = "";
    uint64_t shape[ST_MAX_DIMS];
    int have_dtype = 0, have_shape = 0, have_offsets = 0, n;
    if (!expect_char(c, '{'))
        return ds_fail(DS_ERR_FORMAT, "safetensors: entry '%s' is not an object", t->name);
    do {
        if (!parse_string(c, key, sizeof key) || !expect_char(c, ':'))
            return ds_fail(DS_ERR_FORMAT, "safetensors: bad key in entry '%s'", t->name);
        if (strcmp(key, "dtype") == 0) {
            if (!parse_string(c, dtype, sizeof dtype))
                return ds_fail(DS_ERR_FORMAT, "safetensors: bad dtype in '%s'", t->name);
            have_dtype = 1;
        } else if (strcmp(key, "shape") == 0) {
            if (!parse_uint_array(c, shape, ST_MAX_DIMS, &n))
                return ds_fail(DS_ERR_FORMAT, "safetensors: bad shape in '%s' (at most %d non-negative integers)",
                               t->name, ST_MAX_DIMS);
            t->ndim = n;
            for (int i = 0; i < n; i++)
                t->shape[i] = (int64_t)shape[i];
            have_shape = 1;
        } else if (strcmp(key, "data_offsets") == 0) {
            if (!parse_uint_array(c, offsets, 2, &n) || n != 2)
                return ds_fail(DS_ERR_FORMAT, "safetensors: data_offsets of '%s' must be [begin, end]", t->name);
            have_offsets = 1;
        } else {
            return ds_fail(DS_ERR_FORMAT, "safetensors: unknown key '%s' in entry '%s'", key, t->name);
        }
    } while (expect_char(c, ','));
    if (!expect_char(c, '}'))
        return ds_fail(DS_ERR_FORMAT, "safetensors: unterminated entry '%s'", t->name);
    if (!have_dtype || !have_shape || !have_offsets)
        return ds_fail(DS_ERR_FORMAT, "safetensors: entry '%s' lacks dtype, shape or data_offsets", t->name);
    if (strcmp(dtype, "F32") != 0)
        return ds_fail(DS_ERR_FORMAT, "safetensors: tensor '%s' has dtype %s; expected F32", t->name, dtype);
    return DS_OK;
}

static int compare_by_offset(const void *a, const void *b)
{
    const st_tensor *x = a, *y = b;
    return (x->data > y->data) - (x->data < y->data);
}

ds_status ds_st_parse(st_file *file, uint8_t *bytes, size_t nbytes)
{
    memset(file, 0, sizeof *file);
    file->bytes = bytes;
    file->nbytes = nbytes;
    if (nbytes < 8)
        return ds_fail(DS_ERR_FORMAT, "safetensors: file is %zu bytes, too short for a header", nbytes);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--)
        header_len = (header_len << 8) | bytes[i];
    if (header_len > ST_MAX_HEADER || header_len > nbytes - 8)
        return ds_fail(DS_ERR_FORMAT, "safetensors: header length %llu exceeds the file (%zu bytes): truncated or not a safetensors file",
                       (unsigned long long)header_len, nbytes);
    const uint8_t *data = bytes + 8 + header_len;
    size_t data_len = nbytes - 8 - (size_t)header_len;
    json_cursor c = {(const char *)bytes + 8, (const char *)bytes + 8 + header_len};

    int cap = 16;
    file->tensors = calloc((size_t)cap, sizeof *file->tensors);
    if (!file->tensors)
        return ds_fail(DS_ERR_NOMEM, "safetensors: out of memory");
    if (!expect_char(&c, '{'))
        return ds_fail(DS_ERR_FORMAT, "safetensors: header is not a JSON object");
    if (!expect_char(&c, '}')) {
        do {
            char name[ST_MAX_NAME];
            if (!parse_string(&c, name, sizeof name) || !expect_char(&c, ':'))
                return ds_fail(DS_ERR_FORMAT, "safetensors: bad tensor name in header (at most %d bytes)", ST_MAX_NAME - 1);
            if (strcmp(name, "__metadata__") == 0) {
                DS_TRY(parse_metadata(&c));
                continue;
            }
            if (ds_st_find(file, name))
                return ds_fail(DS_ERR_FORMAT, "safetensors: tensor '%s' appears twice", name);
            if (file->ntensors == cap) {
                st_tensor *grown = realloc(file->tensors, (size_t)cap * 2 * sizeof *grown);
                if (!grown)
                    return ds_fail(DS_ERR_NOMEM, "safetensors: out of memory");
                file->tensors = grown;
                cap *= 2;
            }
            st_tensor *t = &file->tensors[file->ntensors];
            memset(t, 0, sizeof *t);
            strcpy(t->name, name);
            uint64_t offsets[2];
            DS_TRY(parse_tensor_entry(&c, t, offsets));
            file->ntensors++;
            uint64_t count = 1;
            for (int i = 0; i < t->ndim; i++) {
                if (t->shape[i] > (int64_t)(1u << 31) || count > (UINT64_MAX >> 33))
                    return ds_fail(DS_ERR_FORMAT, "safetensors: tensor '%s' has an absurd shape", name);
                count *= (uint64_t)t->shape[i];
            }
            if (offsets[0] > offsets[1] || offsets[1] > data_len)
                return ds_fail(DS_ERR_FORMAT, "safetensors: tensor '%s' spans bytes %llu..%llu but the data section has %zu bytes: the file is truncated",
                               name, (unsigned long long)offsets[0], (unsigned long long)offsets[1], data_len);
            if (offsets[1] - offsets[0] != count * 4)
                return ds_fail(DS_ERR_FORMAT, "safetensors: tensor '%s' has %llu bytes of data; its shape needs %llu",
                               name, (unsigned long long)(offsets[1] - offsets[0]), (unsigned long long)(count * 4));
            t->data = data + offsets[0];
            t->count = (size_t)count;
        } while (expect_char(&c, ','));
        if (!expect_char(&c, '}'))
            return ds_fail(DS_ERR_FORMAT, "safetensors: header JSON is malformed");
    }
    skip_ws(&c);
    if (c.p != c.end)
        return ds_fail(DS_ERR_FORMAT, "safetensors: trailing bytes after the header JSON");

    /* Tensors must tile the data section exactly: no overlap, no gap, nothing after. */
    st_tensor *sorted = malloc((size_t)(file->ntensors ? file->ntensors : 1) * sizeof *sorted);
    if (!sorted)
        return ds_fail(DS_ERR_NOMEM, "safetensors: out of memory");
    memcpy(sorted, file->tensors, (size_t)file->ntensors * sizeof *sorted);
    qsort(sorted, (size_t)file->ntensors, sizeof *sorted, compare_by_offset);
    size_t expected = 0;
    ds_status rc = DS_OK;
    for (int i = 0; i < file->ntensors && rc == DS_OK; i++) {
        size_t begin = (size_t)(sorted[i].data - data);
        if (begin != expected)
            rc = ds_fail(DS_ERR_FORMAT, "safetensors: tensor '%s' starts at byte %zu, expected %zu (overlap or gap)",
                         sorted[i].name, begin, expected);
        expected = begin + sorted[i].count * 4;
    }
    if (rc == DS_OK && expected != data_len)
        rc = ds_fail(DS_ERR_FORMAT, "safetensors: %zu bytes of data after the last tensor", data_len - expected);
    free(sorted);
    return rc;
}

ds_status ds_st_read(st_file *file, const char *path)
{
    memset(file, 0, sizeof *file);
    FILE *f = fopen(path, "rb");
    if (!f)
        return ds_fail(DS_ERR_IO, "cannot open weights file '%s': %s", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return ds_fail(DS_ERR_IO, "cannot seek in '%s'", path);
    }
    long size = ftell(f);
    rewind(f);
    if (size < 0) {
        fclose(f);
        return ds_fail(DS_ERR_IO, "cannot read '%s'", path);
    }
    uint8_t *bytes = malloc(size ? (size_t)size : 1);
    if (!bytes) {
        fclose(f);
        return ds_fail(DS_ERR_NOMEM, "out of memory reading '%s' (%ld bytes)", path, size);
    }
    size_t got = fread(bytes, 1, (size_t)size, f);
    fclose(f);
    if (got != (size_t)size) {
        free(bytes);
        return ds_fail(DS_ERR_IO, "short read on '%s'", path);
    }
    ds_status rc = ds_st_parse(file, bytes, (size_t)size);
    if (rc != DS_OK) {
        char message[512];
        snprintf(message, sizeof message, "%.300s (file '%.180s')", ds_last_error(), path);
        ds_st_free(file);
        return ds_fail(rc, "%s", message);
    }
    return DS_OK;
}

const st_tensor *ds_st_find(const st_file *file, const char *name)
{
    for (int i = 0; i < file->ntensors; i++)
        if (strcmp(file->tensors[i].name, name) == 0)
            return &file->tensors[i];
    return NULL;
}

void ds_st_free(st_file *file)
{
    free(file->bytes);
    free(file->tensors);
    memset(file, 0, sizeof *file);
}
