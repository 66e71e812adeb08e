/* op_shapes.c - the shape checks every backend makes when an op is built (ops.h), written once so
 * that both backends accept and refuse exactly the same ops, with the same messages. */
#include "ops.h"

ds_status conv_desc_check(const conv_desc *d)
{
    int span = (d->kernel - 1) * d->dilation + 1;
    int expect_h, expect_w;
    if (d->transposed) {
        expect_h = (d->in_height - 1) * d->stride + span - d->pad_before - d->pad_after;
        expect_w = (d->in_width - 1) * d->stride + span - d->pad_before - d->pad_after;
    } else {
        expect_h = (d->in_height + d->pad_before + d->pad_after - span) / d->stride + 1;
        expect_w = (d->in_width + d->pad_before + d->pad_after - span) / d->stride + 1;
    }
    if (d->batch < 1 || d->in_channels < 1 || d->out_channels < 1 || d->kernel < 1 || d->stride < 1 ||
        d->dilation < 1 || d->pad_before < 0 || d->pad_after < 0 || expect_h != d->out_height ||
        expect_w != d->out_width)
        return ds_fail(DS_ERR_VALUE, "convolution: inconsistent shape (input %dx%d, output %dx%d, kernel %d, stride %d)",
                       d->in_height, d->in_width, d->out_height, d->out_width, d->kernel, d->stride);
    return DS_OK;
}

ds_status maxpool_shape_check(int batch, int channels, int height, int width, int out_height, int out_width,
                              int kernel, int stride, int pad_before, int pad_after)
{
    if (batch < 1 || channels < 1 || height < 1 || width < 1 || kernel < 1 || kernel > MAXPOOL_MAX_KERNEL ||
        stride < 1 || pad_before < 0 || pad_after < 0 || pad_before >= kernel || pad_after >= kernel ||
        out_height < 1 || out_width < 1 || (height + pad_before + pad_after - kernel) / stride + 1 != out_height ||
        (width + pad_before + pad_after - kernel) / stride + 1 != out_width)
        return ds_fail(DS_ERR_VALUE, "max-pool: inconsistent shape");
    return DS_OK;
}
