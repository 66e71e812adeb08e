/* test_core.c - C-level tests of the core, run under AddressSanitizer/LeakSanitizer by .ci/run:
 * the safetensors reader on malformed buffers, model loading errors, and a forward pass whose
 * result is finite, in (0, 1), deterministic and equal whichever plan (batch, stages) computes it;
 * the polarity histograms on a hand-counted cell and their argument checks.
 * Usage: test_core <weights.safetensors> */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "model.h"
#include "polarity.h"
#include "safetensors.h"

/* Builds a safetensors buffer from a header string and `data_len` bytes of data. */
static uint8_t *make_file(const char *header, size_t data_len, size_t *nbytes)
{
    size_t header_len = strlen(header);
    *nbytes = 8 + header_len + data_len;
    uint8_t *bytes = calloc(1, *nbytes);
    for (int i = 0; i < 8; i++)
        bytes[i] = (uint8_t)((uint64_t)header_len >> (8 * i));
    memcpy(bytes + 8, header, header_len);
    return bytes;
}

static void expect_parse(const char *header, size_t data_len, ds_status expected, const char *fragment)
{
    size_t nbytes;
    uint8_t *bytes = make_file(header, data_len, &nbytes);
    st_file file;
    ds_status rc = ds_st_parse(&file, bytes, nbytes);
    CHECK(rc == expected, "header %s: status %d, expected %d (%s)", header, rc, expected, ds_last_error());
    if (fragment)
        CHECK(strstr(ds_last_error(), fragment) != NULL, "header %s: message '%s' lacks '%s'", header,
              ds_last_error(), fragment);
    ds_st_free(&file);
}

static void test_safetensors_parser(void)
{
    /* headers padded so that the data starts 4-byte aligned */
    expect_parse("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}   ", 8, DS_OK, NULL);
    expect_parse("{\"__metadata__\":{\"k\":\"v\"},\"a\":{\"shape\":[1],\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4,
                 DS_OK, NULL);
    expect_parse("{\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]}}   ", 4, DS_ERR_FORMAT, "F16");
    expect_parse("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}   ", 4, DS_ERR_FORMAT, "truncated");
    expect_parse("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}   ", 8, DS_ERR_FORMAT, "shape needs");
    expect_parse("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],"
                 "\"data_offsets\":[0,4]}}", 8, DS_ERR_FORMAT, "overlap");
    expect_parse("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[1],"
                 "\"data_offsets\":[4,8]}}", 8, DS_ERR_FORMAT, "twice");
    expect_parse("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]} ", 4, DS_ERR_FORMAT, "malformed");
    expect_parse("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}  ", 4, DS_ERR_FORMAT, "shape");
    expect_parse("[1,2,3]", 0, DS_ERR_FORMAT, "object");
    expect_parse("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}    ", 12, DS_ERR_FORMAT, "after the last");

    size_t nbytes;
    uint8_t *bytes = make_file("{}", 0, &nbytes);
    bytes[0] = 0xff; /* header length far beyond the file */
    st_file file;
    CHECK(ds_st_parse(&file, bytes, nbytes) == DS_ERR_FORMAT, "oversized header length accepted");
    ds_st_free(&file);
    uint8_t *tiny = malloc(3);
    CHECK(ds_st_parse(&file, tiny, 3) == DS_ERR_FORMAT, "3-byte file accepted");
    ds_st_free(&file);
    CHECK(ds_st_read(&file, "/nonexistent/weights.safetensors") == DS_ERR_IO, "missing file not reported");
}

static void test_model(const char *weights)
{
    ds_model *model = NULL;
    CHECK(ds_model_load(&model, "/nonexistent.safetensors", DS_MATH_FLOAT32) == DS_ERR_IO, "missing weights accepted");
    CHECK(ds_model_load(&model, weights, DS_MATH_TF32) == DS_ERR_VALUE && !model, "TF32 accepted by the CPU backend");
    CHECK(ds_model_load(&model, weights, DS_MATH_FLOAT32) == DS_OK, "cannot load %s: %s", weights, ds_last_error());
    if (!model)
        return;
    CHECK(ds_model_num_parameters(model) == 4037249, "parameter count %zu", ds_model_num_parameters(model));

    enum { B = 2, H = 48, W = 40 };
    float *input = malloc(sizeof(float) * B * H * W), *out = malloc(sizeof(float) * B * H * W);
    float *again = malloc(sizeof(float) * B * H * W), *single = malloc(sizeof(float) * H * W);
    srand(12345);
    for (int i = 0; i < B * H * W; i++)
        input[i] = (float)rand() / (float)RAND_MAX;
    CHECK(ds_model_forward(model, B, H, W, input, out) == DS_OK, "forward: %s", ds_last_error());
    int in_range = 1;
    for (int i = 0; i < B * H * W; i++)
        in_range &= isfinite(out[i]) && out[i] > 0.0f && out[i] < 1.0f;
    CHECK(in_range, "forward output not finite in (0, 1)");
    CHECK(ds_model_forward(model, B, H, W, input, again) == DS_OK && memcmp(out, again, sizeof(float) * B * H * W) == 0,
          "forward is not deterministic");
    CHECK(ds_model_forward(model, 1, H, W, input + H * W, single) == DS_OK, "forward batch 1: %s", ds_last_error());
    float worst = 0.0f;
    for (int i = 0; i < H * W; i++)
        worst = fmaxf(worst, fabsf(single[i] - out[H * W + i]));
    CHECK(worst < 1e-5f, "batch-1 and batch-2 plans differ by %g", worst);

    /* three stage calls give the same map as the one-shot plan */
    float *features = malloc(sizeof(float) * (H / 8) * (W / 8) * 384), *trunk = malloc(sizeof(float) * (H / 8) * (W / 8) * 128);
    CHECK(ds_model_forward_stages(model, STAGE_ENCODER, STAGE_ENCODER, 1, H, W, input, features) == DS_OK &&
          ds_model_forward_stages(model, STAGE_TRUNK, STAGE_TRUNK, 1, H / 8, W / 8, features, trunk) == DS_OK &&
          ds_model_forward_stages(model, STAGE_DECODER, STAGE_DECODER, 1, H / 8, W / 8, trunk, single) == DS_OK,
          "staged forward: %s", ds_last_error());
    CHECK(memcmp(single, out, sizeof(float) * H * W) == 0, "staged forward differs from the one-shot plan");

    CHECK(ds_model_forward(model, 1, 12, 16, input, out) == DS_ERR_VALUE, "height 12 accepted");
    CHECK(ds_model_forward(model, 0, 16, 16, input, out) == DS_ERR_VALUE, "batch 0 accepted");
    CHECK(ds_model_forward_stages(model, 2, 1, 1, 16, 16, input, out) == DS_ERR_VALUE, "stages 2..1 accepted");
    free(input);
    free(out);
    free(again);
    free(single);
    free(features);
    free(trunk);
    ds_model_free(model);
}

/* One 5x5 cell centred on pixel (2, 2), four bins of 90 degrees starting at -45 degrees: right, up,
 * left, down. The centre pixel has angle 0 (right); every other pixel is counted by hand. */
static void test_polarity(void)
{
    enum { H = 5, W = 5, BINS = 4 };
    int32_t cell_of_pixel[H * W];
    for (int i = 0; i < H * W; i++)
        cell_of_pixel[i] = 0;
    cell_of_pixel[0] = -1; /* corner (0, 0): not cytoplasm */
    const double centroid[2] = {2.0, 2.0}, origin = -M_PI / 4;
    const double spots[4][2] = {{2.0, 4.2}, {0.4, 2.1}, {1.0, 0.0} /* up-left: bin 2 */, {9.0, 9.0} /* outside */};
    int64_t area[BINS], count[BINS];
    int32_t cell_of_spot[4], bin_of_pixel[H * W];
    CHECK(ds_polarity_histograms(area, count, cell_of_spot, bin_of_pixel, H, W, cell_of_pixel, 1, centroid, &origin,
                                 BINS, &spots[0][0], 4) == DS_OK, "polarity: %s", ds_last_error());
    /* 24 cytoplasm pixels (all but the corner); the pixels straight right, up, left and down of the centre
     * lie mid-bin, so rounding cannot move them */
    int64_t total = area[0] + area[1] + area[2] + area[3];
    CHECK(total == 24, "polarity: %lld cytoplasm pixels counted, expected 24", (long long)total);
    CHECK(bin_of_pixel[0] == -1 && bin_of_pixel[2 * W + 4] == 0 && bin_of_pixel[0 * W + 2] == 1 &&
          bin_of_pixel[2 * W + 0] == 2 && bin_of_pixel[4 * W + 2] == 3, "polarity: axis pixels in the wrong bins");
    CHECK(count[0] == 1 && count[1] == 1 && count[2] == 1 && count[3] == 0, "polarity: spot counts %lld %lld %lld %lld",
          (long long)count[0], (long long)count[1], (long long)count[2], (long long)count[3]);
    CHECK(cell_of_spot[0] == 0 && cell_of_spot[3] == -1, "polarity: spot cells %d %d", cell_of_spot[0], cell_of_spot[3]);
    cell_of_pixel[7] = 3;
    CHECK(ds_polarity_histograms(area, count, cell_of_spot, NULL, H, W, cell_of_pixel, 1, centroid, &origin, BINS,
                                 &spots[0][0], 4) == DS_ERR_VALUE, "polarity: pixel naming cell 3 of 1 accepted");
    CHECK(ds_polarity_histograms(area, count, cell_of_spot, NULL, H, W, cell_of_pixel, 1, centroid, &origin, 0,
                                 &spots[0][0], 4) == DS_ERR_VALUE, "polarity: 0 bins accepted");
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s weights.safetensors\n", argv[0]);
        return 2;
    }
    test_safetensors_parser();
    test_model(argv[1]);
    test_polarity();
    if (check_failures) {
        fprintf(stderr, "%d check(s) failed\n", check_failures);
        return 1;
    }
    printf("test_core: all checks passed\n");
    return 0;
}
