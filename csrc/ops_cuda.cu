/* ops_cuda.cu - the GPU backend of ops.h (the backend, its memory, the inference and training ops) on
 * cuDNN 9's legacy convolution and batch-norm API, for the extension module _core_cuda; kernels_cuda.cu
 * holds the element-wise kernels, the loss and the optimizer.
 * Activations are NHWC float32 in device memory and filters are kept in cuDNN's matching KRSC layout,
 * reordered from the caller's [out, in, k, k] by a small kernel. Where cuDNN does not fit, our own
 * kernels do the work: the asymmetric padding of TF 'same' (cuDNN pads symmetrically, so the odd row
 * becomes an explicit zero row of a padded copy), bias and activation post-ops, the folded inference
 * batch norm, the bias gradient, max pooling and concatenation.
 * Ops are planned once at creation (descriptors, algorithms, workspace) and then only queued on the
 * backend's stream: nothing executes synchronously and nothing is read back to the host. */
#include "cuda_backend.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* The most workspace one cuDNN algorithm may take; faster algorithms beyond it are skipped. */
#define WORKSPACE_CAP ((size_t)256 << 20)

/* Regions of the shared workspace start on cudaMalloc's alignment. */
static size_t aligned(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

/* ================================================================ backend */

/* cudaGetDeviceCount fails cleanly where there is no driver (cudart is linked statically). */
static ds_status first_device_present(void)
{
    int count = 0, driver = 0;
    /* without a driver the runtime reports "driver version is insufficient": say what that means */
    if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0)
        return ds_fail(DS_ERR_BACKEND, "no NVIDIA GPU or driver found");
    cudaError_t rc = cudaGetDeviceCount(&count);
    if (rc == cudaErrorNoDevice || (rc == cudaSuccess && count < 1))
        return ds_fail(DS_ERR_BACKEND, "no NVIDIA GPU found (driver %d present)", driver);
    if (rc != cudaSuccess)
        return ds_fail(DS_ERR_BACKEND, "no usable CUDA device: %s", cudaGetErrorString(rc));
    return DS_OK;
}

ds_status ds_backend_probe(char *description, size_t size)
{
    DS_TRY(first_device_present());
    cudaDeviceProp prop;
    int runtime = 0, driver = 0;
    CUDA_TRY(cudaGetDeviceProperties(&prop, 0));
    CUDA_TRY(cudaRuntimeGetVersion(&runtime));
    CUDA_TRY(cudaDriverGetVersion(&driver));
    snprintf(description, size, "%s (sm_%d%d, %zu GiB), CUDA runtime %d, driver %d, cuDNN %zu", prop.name,
             prop.major, prop.minor, (size_t)(prop.totalGlobalMem >> 30), runtime, driver, cudnnGetVersion());
    return DS_OK;
}

/* Fills a zeroed backend; on failure ds_backend_destroy releases whatever was made. */
static ds_status backend_init(ds_backend *b)
{
    cudaStream_t stream = NULL;
    cudnnHandle_t cudnn = NULL;
    CUDA_TRY(cudaSetDevice(b->device));
    CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    b->stream = stream;
    CUDNN_TRY(cudnnCreate(&cudnn));
    b->cudnn = cudnn;
    CUDNN_TRY(cudnnSetStream(b->cudnn, b->stream));
    double *scratch = NULL;
    CUDA_TRY(cudaMalloc((void **)&scratch, DS_SCRATCH_DOUBLES * sizeof(double)));
    b->scratch = scratch;
    CUDA_TRY(cudaMemsetAsync(b->scratch, 0, DS_SCRATCH_DOUBLES * sizeof(double), b->stream));
    return DS_OK;
}

int ds_cpu_has_bf16(void) { return 0; }

ds_status ds_backend_create(ds_backend **backend, int math_mode)
{
    if (math_mode == DS_MATH_BF16)
        return ds_fail(DS_ERR_VALUE, "bf16 is the CPU backend's mode; on the GPU use float32 or tf32");
    if (math_mode != DS_MATH_FLOAT32 && math_mode != DS_MATH_TF32)
        return ds_fail(DS_ERR_VALUE, "unknown math mode %d", math_mode);
    DS_TRY(first_device_present());
    ds_backend *b = (ds_backend *)calloc(1, sizeof *b);
    if (!b)
        return ds_fail(DS_ERR_NOMEM, "out of memory");
    b->device = 0;
    b->math_mode = math_mode;
    ds_status rc = backend_init(b);
    if (rc != DS_OK) {
        ds_backend_destroy(b);
        return rc;
    }
    *backend = b;
    return DS_OK;
}

void ds_backend_destroy(ds_backend *backend)
{
    if (!backend)
        return;
    if (backend->stream)
        cudaStreamSynchronize(backend->stream); /* queued work may still use the buffers freed below */
    cudaFree(backend->workspace);
    cudaFree(backend->scratch);
    if (backend->cudnn)
        cudnnDestroy(backend->cudnn);
    if (backend->stream)
        cudaStreamDestroy(backend->stream);
    free(backend);
}

ds_status ds_backend_synchronize(ds_backend *backend)
{
    CUDA_TRY(cudaStreamSynchronize(backend->stream));
    return DS_OK;
}

ds_status ds_backend_reserve_workspace(ds_backend *backend, size_t bytes)
{
    if (bytes <= backend->workspace_bytes)
        return DS_OK;
    /* the new one first: if it cannot be had, the ops built so far keep the workspace they were sized for */
    void *workspace = NULL;
    CUDA_TRY(cudaMalloc(&workspace, bytes));
    cudaError_t rc = cudaStreamSynchronize(backend->stream); /* queued ops may still use the old one */
    if (rc != cudaSuccess) {
        cudaFree(workspace);
        return ds_fail(DS_ERR_BACKEND, "CUDA: %s", cudaGetErrorString(rc));
    }
    cudaFree(backend->workspace);
    backend->workspace = workspace;
    backend->workspace_bytes = bytes;
    return DS_OK;
}

/* ================================================================ backend memory */

ds_status ds_backend_alloc(ds_backend *backend, void **memory, size_t bytes)
{
    *memory = NULL;
    if (bytes == 0)
        return DS_OK;
    void *p = NULL;
    CUDA_TRY(cudaMalloc(&p, bytes));
    cudaError_t rc = cudaMemsetAsync(p, 0, bytes, backend->stream);
    if (rc != cudaSuccess) {
        cudaFree(p);
        return ds_fail(DS_ERR_BACKEND, "CUDA: cannot zero %zu new bytes: %s", bytes, cudaGetErrorString(rc));
    }
    *memory = p;
    return DS_OK;
}

void ds_backend_free(ds_backend *backend, void *memory)
{
    if (!memory)
        return;
    cudaStreamSynchronize(backend->stream); /* queued work may still use it */
    cudaFree(memory);
}

ds_status ds_backend_upload(ds_backend *backend, void *dst, const void *host_src, size_t bytes)
{
    if (bytes == 0)
        return DS_OK;
    CUDA_TRY(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, backend->stream));
    /* from page-locked memory the copy would still be reading host_src, which the caller may reuse at once */
    CUDA_TRY(cudaStreamSynchronize(backend->stream));
    return DS_OK;
}

ds_status ds_backend_download(ds_backend *backend, void *host_dst, const void *src, size_t bytes)
{
    if (bytes == 0)
        return DS_OK;
    CUDA_TRY(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, backend->stream));
    CUDA_TRY(cudaStreamSynchronize(backend->stream));
    return DS_OK;
}

ds_status ds_backend_copy(ds_backend *backend, void *dst, const void *src, size_t bytes)
{
    if (bytes == 0)
        return DS_OK;
    CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, backend->stream));
    return DS_OK;
}

ds_status ds_backend_zero(ds_backend *backend, void *dst, size_t bytes)
{
    if (bytes == 0)
        return DS_OK;
    CUDA_TRY(cudaMemsetAsync(dst, 0, bytes, backend->stream));
    return DS_OK;
}

/* Device memory of an op, freed with it; filled by the op before it is read. */
static ds_status device_alloc(void **memory, size_t bytes)
{
    void *p = NULL;
    CUDA_TRY(cudaMalloc(&p, bytes));
    *memory = p;
    return DS_OK;
}

/* A device copy of host data given at creation; the host array may go as soon as this returns. */
static ds_status device_copy_of(ds_backend *b, float **dst, const float *host, size_t count)
{
    float *p = NULL;
    DS_TRY(device_alloc((void **)&p, count * sizeof(float)));
    ds_status rc = ds_backend_upload(b, p, host, count * sizeof(float));
    if (rc != DS_OK) {
        cudaFree(p);
        return rc;
    }
    *dst = p;
    return DS_OK;
}

static cudnnStatus_t nhwc_tensor(cudnnTensorDescriptor_t *t, int n, int c, int h, int w)
{
    cudnnStatus_t rc = cudnnCreateTensorDescriptor(t);
    return rc != CUDNN_STATUS_SUCCESS ? rc : cudnnSetTensor4dDescriptor(*t, CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, n, c, h, w);
}

/* ================================================================ convolution kernels */

typedef struct {
    int n, h, w, c;       /* NHWC, without the explicit padding */
    int before, after;    /* explicit zero rows and columns before and after */
} padded_shape;

static __host__ __device__ int padded_height(padded_shape s) { return s.h + s.before + s.after; }
static __host__ __device__ int padded_width(padded_shape s) { return s.w + s.before + s.after; }
static size_t padded_count(padded_shape s) { return (size_t)s.n * padded_height(s) * padded_width(s) * s.c; }
static size_t unpadded_count(padded_shape s) { return (size_t)s.n * s.h * s.w * s.c; }

/* padded = src surrounded by s.before / s.after zero rows and columns */
static __global__ void pad_kernel(float *padded, const float *src, padded_shape s, size_t count)
{
    int ph = padded_height(s), pw = padded_width(s);
    GRID_STRIDE_LOOP(i, count) {
        int c = (int)(i % s.c);
        size_t t = i / s.c;
        int w = (int)(t % pw) - s.before;
        t /= pw;
        int h = (int)(t % ph) - s.before;
        size_t n = t / ph;
        padded[i] = h >= 0 && h < s.h && w >= 0 && w < s.w ? src[((n * s.h + h) * s.w + w) * s.c + c] : 0.0f;
    }
}

/* dst = act(conv cropped to dst + bias + (accumulate ? dst : 0)), conv laid out as s with its padding;
 * conv may be dst itself when s has none (each value is read before it is written, by the same thread). */
static __global__ void conv_epilogue_kernel(float *dst, const float *conv, padded_shape s, const float *bias,
                                            int accumulate, unsigned post, size_t count)
{
    int ph = padded_height(s), pw = padded_width(s);
    GRID_STRIDE_LOOP(i, count) {
        int c = (int)(i % s.c);
        size_t t = i / s.c;
        int w = (int)(t % s.w);
        t /= s.w;
        int h = (int)(t % s.h);
        size_t n = t / s.h;
        float v = conv[((n * ph + h + s.before) * pw + w + s.before) * s.c + c];
        if (bias)
            v += bias[c];
        if (accumulate)
            v += dst[i];
        if (post & POST_RELU)
            v = v < 0.0f ? 0.0f : v; /* NaN passes, as on the CPU */
        if (post & POST_SIGMOID)
            v = ds_sigmoid(v);
        dst[i] = v;
    }
}

/* Between the caller's weights [out, in, k, k] and cuDNN's KRSC filter [k_count, taps, c_count]. A
 * transposed convolution's filter has K = its in, C = its out: the first two dims swap, taps stay. */
static __global__ void filter_reorder_kernel(float *dst, const float *src, int k_count, int c_count, int taps,
                                             int transposed, int to_krsc)
{
    size_t count = (size_t)k_count * taps * c_count;
    GRID_STRIDE_LOOP(krsc, count) {
        int c = (int)(krsc % c_count);
        size_t t = krsc / c_count;
        int tap = (int)(t % taps);
        int k = (int)(t / taps);
        size_t oihw = transposed ? ((size_t)c * k_count + k) * taps + tap : ((size_t)k * c_count + c) * taps + tap;
        if (to_krsc)
            dst[krsc] = src[oihw];
        else
            dst[oihw] = src[krsc];
    }
}

/* The bias gradient: per channel, the sum of ddst over all pixels, in a fixed order (deterministic) and
 * in double. Stage one: a block of 32 channels x 8 rows sums one chunk of pixels; stage two adds the
 * chunks. Our own rather than cudnnConvolutionBackwardBias, whose NHWC support and order are undocumented. */
#define BIAS_TILE_CHANNELS 32
#define BIAS_TILE_ROWS 8
#define BIAS_MAX_CHUNKS 64
#define BIAS_PIXELS_PER_CHUNK 4096

static int bias_chunks(size_t pixels)
{
    size_t chunks = (pixels + BIAS_PIXELS_PER_CHUNK - 1) / BIAS_PIXELS_PER_CHUNK;
    return chunks < 1 ? 1 : chunks > BIAS_MAX_CHUNKS ? BIAS_MAX_CHUNKS : (int)chunks;
}

static __global__ void channel_sum_partial_kernel(double *partials, const float *x, size_t pixels, int channels,
                                                  size_t chunk)
{
    __shared__ double rows[BIAS_TILE_ROWS][BIAS_TILE_CHANNELS];
    int c = blockIdx.x * BIAS_TILE_CHANNELS + threadIdx.x;
    size_t begin = (size_t)blockIdx.y * chunk, end = begin + chunk < pixels ? begin + chunk : pixels;
    double sum = 0.0;
    if (c < channels)
        for (size_t p = begin + threadIdx.y; p < end; p += BIAS_TILE_ROWS)
            sum += x[p * channels + c];
    rows[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < channels) {
        for (int r = 1; r < BIAS_TILE_ROWS; r++)
            sum += rows[r][threadIdx.x];
        partials[(size_t)blockIdx.y * channels + c] = sum;
    }
}

static __global__ void channel_sum_finish_kernel(float *sums, const double *partials, int chunks, int channels)
{
    GRID_STRIDE_LOOP(c, (size_t)channels) {
        double sum = 0.0;
        for (int k = 0; k < chunks; k++)
            sum += partials[(size_t)k * channels + c];
        sums[c] = (float)sum;
    }
}

static ds_status pad_copy(ds_backend *b, float *padded, const float *src, padded_shape s)
{
    size_t count = padded_count(s);
    pad_kernel<<<ds_blocks(count), DS_THREADS, 0, b->stream>>>(padded, src, s, count);
    LAUNCH_TRY();
    return DS_OK;
}

static ds_status conv_epilogue(ds_backend *b, float *dst, const float *conv, padded_shape s, const float *bias,
                               int accumulate, unsigned post)
{
    size_t count = unpadded_count(s);
    conv_epilogue_kernel<<<ds_blocks(count), DS_THREADS, 0, b->stream>>>(dst, conv, s, bias, accumulate, post,
                                                                           count);
    LAUNCH_TRY();
    return DS_OK;
}

static ds_status channel_sums(ds_backend *b, float *sums, double *partials, const float *x, size_t pixels,
                              int channels)
{
    int chunks = bias_chunks(pixels);
    size_t chunk = (pixels + chunks - 1) / chunks;
    dim3 grid((channels + BIAS_TILE_CHANNELS - 1) / BIAS_TILE_CHANNELS, chunks), block(BIAS_TILE_CHANNELS, BIAS_TILE_ROWS);
    channel_sum_partial_kernel<<<grid, block, 0, b->stream>>>(partials, x, pixels, channels, chunk);
    LAUNCH_TRY();
    channel_sum_finish_kernel<<<ds_blocks(channels), DS_THREADS, 0, b->stream>>>(sums, partials, chunks, channels);
    LAUNCH_TRY();
    return DS_OK;
}

/* ================================================================ convolution plans
 * Every (transposed) convolution is phrased as one forward convolution in cuDNN's terms, x -> y:
 * a convolution is src -> dst; a transposed convolution is the data gradient of the forward convolution
 * dst -> src, whose filter (K = its in_channels, C = its out_channels) is the weights with the first two
 * dims swapped and no spatial flip. The x side carries the padding: cuDNN pads it symmetrically by
 * min(pad_before, pad_after) and the rest is explicit zeros in a padded copy of x in the workspace. */

enum { PASS_FORWARD, PASS_BACKWARD_DATA, PASS_BACKWARD_FILTER, PASS_COUNT };
static const char *const pass_names[PASS_COUNT] = {"forward", "backward-data", "backward-filter"};

typedef struct {
    cudnnConvolutionDescriptor_t conv; /* one per pass: it carries the math type of the pass's algorithm */
    int algo;                          /* a cudnnConvolution{Fwd,BwdData,BwdFilter}Algo_t */
    size_t workspace_bytes;
} conv_pass;

typedef struct {
    conv_desc d;
    padded_shape x_side;               /* src of a convolution, dst of a transposed one */
    cudnnTensorDescriptor_t x, y;      /* x includes the explicit padding */
    cudnnFilterDescriptor_t w;         /* KRSC */
    conv_pass pass[PASS_COUNT];        /* conv == NULL where a pass is not needed */
    /* the op's use of the shared workspace, regions in this order */
    size_t padded_bytes, dfilter_bytes, bias_partial_bytes, cudnn_bytes;
} conv_plan;

typedef struct {
    float *padded;          /* the padded copy of the x side */
    float *dfilter;         /* the filter gradient in KRSC, before its reorder to [out, in, k, k] */
    double *bias_partials;  /* per-chunk sums of the bias gradient */
    void *cudnn;
} conv_regions;

static conv_regions regions_of(const conv_plan *p, const ds_backend *b)
{
    char *base = (char *)b->workspace;
    conv_regions r;
    r.padded = (float *)base;
    r.dfilter = (float *)(base + p->padded_bytes);
    r.bias_partials = (double *)(base + p->padded_bytes + p->dfilter_bytes);
    r.cudnn = base + p->padded_bytes + p->dfilter_bytes + p->bias_partial_bytes;
    return r;
}

static int has_padding(const conv_plan *p) { return p->x_side.before != 0 || p->x_side.after != 0; }
/* the forward convolution's filter: K = y-side channels, C = x-side channels */
static int filter_k(const conv_plan *p) { return p->d.transposed ? p->d.in_channels : p->d.out_channels; }
static int filter_c(const conv_plan *p) { return p->d.transposed ? p->d.out_channels : p->d.in_channels; }
static size_t filter_count(const conv_plan *p)
{
    return (size_t)p->d.out_channels * p->d.in_channels * p->d.kernel * p->d.kernel;
}
static padded_shape dst_shape(const conv_desc *d)
{
    padded_shape s = {d->batch, d->out_height, d->out_width, d->out_channels, 0, 0};
    return s;
}

static ds_status filter_reorder(ds_backend *b, const conv_plan *p, float *dst, const float *src, int to_krsc)
{
    size_t count = filter_count(p);
    filter_reorder_kernel<<<ds_blocks(count), DS_THREADS, 0, b->stream>>>(
        dst, src, filter_k(p), filter_c(p), p->d.kernel * p->d.kernel, p->d.transposed, to_krsc);
    LAUNCH_TRY();
    return DS_OK;
}

/* ---- algorithm choice ---- */

#define MAX_CANDIDATES 32

typedef struct {
    int algo;
    cudnnStatus_t status;
    cudnnDeterminism_t determinism;
    cudnnMathType_t math;
} algo_candidate;

/* The three perf structs of cuDNN share these fields under different types. */
template <typename Perf>
static int to_candidates(algo_candidate *out, const Perf *perf, int n)
{
    for (int i = 0; i < n; i++) {
        out[i].algo = (int)perf[i].algo;
        out[i].status = perf[i].status;
        out[i].determinism = perf[i].determinism;
        out[i].math = perf[i].mathType;
    }
    return n;
}

/* cuDNN's heuristic ranking rather than cudnnFind: the choice is reproducible (two ops of one shape
 * compute bit-identical results, runs repeat), and creation benchmarks nothing and allocates nothing. */
static ds_status pass_candidates(ds_backend *b, const conv_plan *p, int kind, algo_candidate *out, int *n)
{
    cudnnConvolutionDescriptor_t conv = p->pass[kind].conv;
    int returned = 0;
    if (kind == PASS_FORWARD) {
        cudnnConvolutionFwdAlgoPerf_t perf[MAX_CANDIDATES];
        CUDNN_TRY(cudnnGetConvolutionForwardAlgorithm_v7(b->cudnn, p->x, p->w, conv, p->y, MAX_CANDIDATES, &returned,
                                                         perf));
        *n = to_candidates(out, perf, returned);
    } else if (kind == PASS_BACKWARD_DATA) {
        cudnnConvolutionBwdDataAlgoPerf_t perf[MAX_CANDIDATES];
        CUDNN_TRY(cudnnGetConvolutionBackwardDataAlgorithm_v7(b->cudnn, p->w, p->y, conv, p->x, MAX_CANDIDATES,
                                                              &returned, perf));
        *n = to_candidates(out, perf, returned);
    } else {
        cudnnConvolutionBwdFilterAlgoPerf_t perf[MAX_CANDIDATES];
        CUDNN_TRY(cudnnGetConvolutionBackwardFilterAlgorithm_v7(b->cudnn, p->x, p->y, conv, p->w, MAX_CANDIDATES,
                                                                &returned, perf));
        *n = to_candidates(out, perf, returned);
    }
    return DS_OK;
}

static cudnnStatus_t pass_workspace_size(ds_backend *b, const conv_plan *p, int kind, int algo, size_t *bytes)
{
    cudnnConvolutionDescriptor_t conv = p->pass[kind].conv;
    if (kind == PASS_FORWARD)
        return cudnnGetConvolutionForwardWorkspaceSize(b->cudnn, p->x, p->w, conv, p->y,
                                                       (cudnnConvolutionFwdAlgo_t)algo, bytes);
    if (kind == PASS_BACKWARD_DATA)
        return cudnnGetConvolutionBackwardDataWorkspaceSize(b->cudnn, p->w, p->y, conv, p->x,
                                                            (cudnnConvolutionBwdDataAlgo_t)algo, bytes);
    return cudnnGetConvolutionBackwardFilterWorkspaceSize(b->cudnn, p->x, p->y, conv, p->w,
                                                          (cudnnConvolutionBwdFilterAlgo_t)algo, bytes);
}

/* The math type a candidate runs with, or -1 where it would break the math mode. Float32 runs
 * everything on FMA (TF32 would miss the CPU backend by far more than float rounding); TF32 runs what
 * cuDNN proposes except the down-conversion to FP16. */
static int candidate_math(cudnnMathType_t proposed, int math_mode)
{
    if (proposed == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION)
        return -1;
    if (math_mode == DS_MATH_FLOAT32)
        return proposed == CUDNN_TENSOR_OP_MATH ? -1 : (int)CUDNN_FMA_MATH;
    return (int)proposed;
}

/* Creates the pass's descriptor and picks the best-ranked algorithm that is supported, keeps the math
 * mode and fits WORKSPACE_CAP: deterministic ones first (repeatable training, bit-identical gradients),
 * any if none qualifies. cuDNN wants the algorithm's math type set on the descriptor it runs with. */
static ds_status pass_choose(ds_backend *b, conv_plan *p, int kind, int symmetric_pad)
{
    conv_pass *pass = &p->pass[kind];
    const conv_desc *d = &p->d;
    CUDNN_TRY(cudnnCreateConvolutionDescriptor(&pass->conv));
    CUDNN_TRY(cudnnSetConvolution2dDescriptor(pass->conv, symmetric_pad, symmetric_pad, d->stride, d->stride,
                                              d->dilation, d->dilation, CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
    CUDNN_TRY(cudnnSetConvolutionMathType(pass->conv,
                                          b->math_mode == DS_MATH_TF32 ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH));
    algo_candidate candidates[MAX_CANDIDATES];
    int n = 0;
    DS_TRY(pass_candidates(b, p, kind, candidates, &n));
    for (int any_determinism = 0; any_determinism <= 1; any_determinism++) {
        for (int i = 0; i < n; i++) {
            const algo_candidate *c = &candidates[i];
            int math = candidate_math(c->math, b->math_mode);
            if (c->status != CUDNN_STATUS_SUCCESS || math < 0 ||
                (!any_determinism && c->determinism != CUDNN_DETERMINISTIC))
                continue;
            CUDNN_TRY(cudnnSetConvolutionMathType(pass->conv, (cudnnMathType_t)math));
            size_t bytes = 0;
            /* a refusal here means this algorithm does not run in this math type: try the next */
            if (pass_workspace_size(b, p, kind, c->algo, &bytes) != CUDNN_STATUS_SUCCESS || bytes > WORKSPACE_CAP)
                continue;
            pass->algo = c->algo;
            pass->workspace_bytes = bytes;
            return DS_OK;
        }
    }
    return ds_fail(DS_ERR_BACKEND, "cuDNN: no %s algorithm for this %sconvolution within %zu MiB of workspace",
                   pass_names[kind], d->transposed ? "transposed " : "", WORKSPACE_CAP >> 20);
}

static void conv_plan_destroy(conv_plan *p)
{
    if (p->x)
        cudnnDestroyTensorDescriptor(p->x);
    if (p->y)
        cudnnDestroyTensorDescriptor(p->y);
    if (p->w)
        cudnnDestroyFilterDescriptor(p->w);
    for (int k = 0; k < PASS_COUNT; k++)
        if (p->pass[k].conv)
            cudnnDestroyConvolutionDescriptor(p->pass[k].conv);
}

/* Descriptors, algorithms and workspace for the passes an op runs: inference needs the one that computes
 * its output; training adds the filter gradient and, with need_dsrc, the data gradient. */
static ds_status conv_plan_create(conv_plan *p, ds_backend *b, const conv_desc *d, int training, int need_dsrc)
{
    p->d = *d;
    int symmetric_pad = d->pad_before < d->pad_after ? d->pad_before : d->pad_after;
    padded_shape src = {d->batch, d->in_height, d->in_width, d->in_channels, 0, 0};
    padded_shape x = d->transposed ? dst_shape(d) : src, y = d->transposed ? src : dst_shape(d);
    x.before = d->pad_before - symmetric_pad;
    x.after = d->pad_after - symmetric_pad;
    p->x_side = x;
    CUDNN_TRY(nhwc_tensor(&p->x, x.n, x.c, padded_height(x), padded_width(x)));
    CUDNN_TRY(nhwc_tensor(&p->y, y.n, y.c, y.h, y.w));
    CUDNN_TRY(cudnnCreateFilterDescriptor(&p->w));
    CUDNN_TRY(cudnnSetFilter4dDescriptor(p->w, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NHWC, filter_k(p), filter_c(p),
                                         d->kernel, d->kernel));
    int data_gradient = training && need_dsrc;
    int needed[PASS_COUNT];
    needed[PASS_FORWARD] = !d->transposed || data_gradient;
    needed[PASS_BACKWARD_DATA] = d->transposed || data_gradient;
    needed[PASS_BACKWARD_FILTER] = training;
    for (int k = 0; k < PASS_COUNT; k++) {
        if (!needed[k])
            continue;
        DS_TRY(pass_choose(b, p, k, symmetric_pad));
        if (p->pass[k].workspace_bytes > p->cudnn_bytes)
            p->cudnn_bytes = p->pass[k].workspace_bytes;
    }
    p->padded_bytes = has_padding(p) ? aligned(padded_count(x) * sizeof(float)) : 0;
    if (training) {
        size_t pixels = (size_t)d->batch * d->out_height * d->out_width;
        p->dfilter_bytes = aligned(filter_count(p) * sizeof(float));
        p->bias_partial_bytes = aligned((size_t)bias_chunks(pixels) * d->out_channels * sizeof(double));
    }
    return ds_backend_reserve_workspace(b, p->padded_bytes + p->dfilter_bytes + p->bias_partial_bytes + p->cudnn_bytes);
}

/* dst = act(conv(src) + bias (+ dst)); filter in KRSC. */
static ds_status conv_plan_forward(const conv_plan *p, ds_backend *b, float *dst, const float *src, const float *filter,
                                   const float *bias, unsigned post)
{
    conv_regions r = regions_of(p, b);
    const float one = 1.0f, zero = 0.0f;
    int sum = (post & POST_SUM) != 0;
    if (!p->d.transposed) {
        const conv_pass *f = &p->pass[PASS_FORWARD];
        const float *x = src;
        if (has_padding(p)) {
            DS_TRY(pad_copy(b, r.padded, src, p->x_side));
            x = r.padded;
        }
        CUDNN_TRY(cudnnConvolutionForward(b->cudnn, &one, p->x, x, p->w, filter, f->conv,
                                          (cudnnConvolutionFwdAlgo_t)f->algo, r.cudnn, f->workspace_bytes,
                                          sum ? &one : &zero, p->y, dst));
        return conv_epilogue(b, dst, dst, dst_shape(&p->d), bias, 0, post);
    }
    /* the output is the x side: computed into the padded copy and cropped from it, or into dst directly */
    const conv_pass *bd = &p->pass[PASS_BACKWARD_DATA];
    float *x = has_padding(p) ? r.padded : dst;
    CUDNN_TRY(cudnnConvolutionBackwardData(b->cudnn, &one, p->w, filter, p->y, src, bd->conv,
                                           (cudnnConvolutionBwdDataAlgo_t)bd->algo, r.cudnn, bd->workspace_bytes,
                                           sum && x == dst ? &one : &zero, p->x, x));
    return conv_epilogue(b, dst, x, p->x_side, bias, sum && x != dst, post);
}

/* ================================================================ max pooling
 * Our own kernels, not cuDNN pooling: cuDNN pads symmetrically (TF 'same' does not) and does not
 * document which of equal maxima wins, while the backward must route the gradient to the same one as
 * oneDNN: the first maximum in row-major window order. Padded cells never win. */

#define POOL_NO_WINNER 255 /* a window entirely in the padding */

typedef struct {
    int n, h, w, c;
    int out_h, out_w, kernel, stride, pad_before;
} pool_shape;

static ds_status pool_shape_make(pool_shape *s, int batch, int channels, int height, int width, int out_height,
                                 int out_width, int kernel, int stride, int pad_before, int pad_after)
{
    DS_TRY(ds_maxpool_shape_check(batch, channels, height, width, out_height, out_width, kernel, stride, pad_before,
                                  pad_after));
    s->n = batch;
    s->h = height;
    s->w = width;
    s->c = channels;
    s->out_h = out_height;
    s->out_w = out_width;
    s->kernel = kernel;
    s->stride = stride;
    s->pad_before = pad_before;
    return DS_OK;
}

/* winner (may be NULL): the offset of the maximum inside its window, row-major */
static __global__ void maxpool_forward_kernel(float *dst, unsigned char *winner, const float *src, pool_shape s,
                                              size_t count)
{
    GRID_STRIDE_LOOP(i, count) {
        int c = (int)(i % s.c);
        size_t t = i / s.c;
        int ow = (int)(t % s.out_w);
        t /= s.out_w;
        int oh = (int)(t % s.out_h);
        size_t n = t / s.out_h;
        float best = -INFINITY;
        int best_at = POOL_NO_WINNER;
        for (int ki = 0; ki < s.kernel; ki++) {
            int ih = oh * s.stride - s.pad_before + ki;
            if (ih < 0 || ih >= s.h)
                continue;
            for (int kj = 0; kj < s.kernel; kj++) {
                int iw = ow * s.stride - s.pad_before + kj;
                if (iw < 0 || iw >= s.w)
                    continue;
                float v = src[((n * s.h + ih) * s.w + iw) * s.c + c];
                if (best_at == POOL_NO_WINNER || v > best) { /* strictly greater: the first maximum stays */
                    best = v;
                    best_at = ki * s.kernel + kj;
                }
            }
        }
        dst[i] = best;
        if (winner)
            winner[i] = (unsigned char)best_at;
    }
}

/* first output index o (along one axis) whose window [o * stride, o * stride + kernel) holds position */
static __device__ int first_window(int position, int kernel, int stride)
{
    int t = position - kernel + 1;
    return t <= 0 ? 0 : (t + stride - 1) / stride;
}

/* Each input value gathers the gradients of the windows it won: deterministic, no atomics. */
static __global__ void maxpool_backward_kernel(float *dsrc, const float *ddst, const unsigned char *winner,
                                               pool_shape s, size_t count)
{
    GRID_STRIDE_LOOP(i, count) {
        int c = (int)(i % s.c);
        size_t t = i / s.c;
        int iw = (int)(t % s.w) + s.pad_before; /* in padded coordinates */
        t /= s.w;
        int ih = (int)(t % s.h) + s.pad_before;
        size_t n = t / s.h;
        int oh_last = min(ih / s.stride, s.out_h - 1), ow_last = min(iw / s.stride, s.out_w - 1);
        float sum = 0.0f;
        for (int oh = first_window(ih, s.kernel, s.stride); oh <= oh_last; oh++) {
            for (int ow = first_window(iw, s.kernel, s.stride); ow <= ow_last; ow++) {
                size_t o = ((n * s.out_h + oh) * s.out_w + ow) * s.c + c;
                if (winner[o] == (ih - oh * s.stride) * s.kernel + (iw - ow * s.stride))
                    sum += ddst[o];
            }
        }
        dsrc[i] = sum;
    }
}

static ds_status maxpool_launch(ds_backend *b, const pool_shape *s, float *dst, unsigned char *winner,
                                const float *src)
{
    size_t count = (size_t)s->n * s->out_h * s->out_w * s->c;
    maxpool_forward_kernel<<<ds_blocks(count), DS_THREADS, 0, b->stream>>>(dst, winner, src, *s, count);
    LAUNCH_TRY();
    return DS_OK;
}

/* ================================================================ batch norm kernels */

/* inference batch norm folded into dst = max(0, src * scale + shift) */
static __global__ void scale_shift_relu_kernel(float *dst, const float *src, const float *scale, const float *shift,
                                               size_t count, int channels)
{
    GRID_STRIDE_LOOP(i, count) {
        int c = (int)(i % channels);
        float v = fmaf(src[i], scale[c], shift[c]);
        dst[i] = v < 0.0f ? 0.0f : v;
    }
}

/* cuDNN's running variance is the unbiased one; Keras normalises with (and reports) the biased one */
static __global__ void biased_variance_kernel(float *variance, int channels, size_t pixels)
{
    GRID_STRIDE_LOOP(c, (size_t)channels)
        variance[c] = pixels > 1 ? variance[c] * (float)((double)(pixels - 1) / (double)pixels) : 0.0f;
}

/* The fused ReLU's backward: ddst = 0 where the pre-activation, recomputed from the forward's own saved
 * mean and 1 / sqrt(variance + epsilon) (cuDNN's "inverse variance") as cuDNN computed it, was not positive. */
static __global__ void batchnorm_relu_mask_kernel(float *ddst, const float *src, const float *saved_mean,
                                                  const float *saved_inv_std, const float *gamma, const float *beta,
                                                  size_t count, int channels)
{
    GRID_STRIDE_LOOP(i, count) {
        int c = (int)(i % channels);
        float pre = gamma[c] * (src[i] - saved_mean[c]) * saved_inv_std[c] + beta[c];
        if (!(pre > 0.0f))
            ddst[i] = 0.0f;
    }
}

/* ================================================================ concatenation */

typedef struct {
    const float *src[CONCAT_MAX_INPUTS];
    int channels[CONCAT_MAX_INPUTS];
    int n_inputs, total_channels;
} concat_inputs;

static __global__ void concat_kernel(float *dst, concat_inputs in, size_t count)
{
    GRID_STRIDE_LOOP(i, count) {
        size_t pixel = i / in.total_channels;
        int c = (int)(i % in.total_channels), k = 0;
        while (c >= in.channels[k])
            c -= in.channels[k++];
        dst[i] = in.src[k][pixel * in.channels[k] + c];
    }
}

/* ================================================================ inference ops */

struct ds_op {
    ds_backend *backend;
    /* convolution */
    conv_plan conv;
    float *filter, *bias;   /* KRSC filter; bias */
    /* batch norm + ReLU */
    float *scale, *shift;   /* per channel, folded from gamma, beta, mean, variance */
    size_t values;
    int channels;
    /* max pooling */
    pool_shape pool;
    /* concatenation: the layout (the pointers are set per call) */
    concat_inputs concat;
    size_t pixels;
};

void ds_op_destroy(ds_op *op)
{
    if (!op)
        return;
    cudaStreamSynchronize(op->backend->stream); /* queued work may still use the op's buffers */
    conv_plan_destroy(&op->conv);
    cudaFree(op->filter);
    cudaFree(op->bias);
    cudaFree(op->scale);
    cudaFree(op->shift);
    free(op);
}

static ds_status op_alloc(ds_op **op, ds_backend *backend)
{
    *op = (ds_op *)calloc(1, sizeof **op);
    if (!*op)
        return ds_fail(DS_ERR_NOMEM, "out of memory");
    (*op)->backend = backend;
    return DS_OK;
}

/* Hands out a built op, or releases a half-built one and passes its error on. */
static ds_status op_finish(ds_op **op_out, ds_op *op, ds_status rc)
{
    if (rc != DS_OK) {
        ds_op_destroy(op);
        return rc;
    }
    *op_out = op;
    return DS_OK;
}

/* ---- convolution and transposed convolution ---- */

static ds_status conv_forward_build(ds_op *op, const conv_desc *d, const float *weight, const float *bias)
{
    ds_backend *b = op->backend;
    DS_TRY(conv_plan_create(&op->conv, b, d, 0, 0));
    DS_TRY(device_copy_of(b, &op->bias, bias, d->out_channels));
    DS_TRY(device_alloc((void **)&op->filter, filter_count(&op->conv) * sizeof(float)));
    float *oihw = NULL;
    DS_TRY(device_copy_of(b, &oihw, weight, filter_count(&op->conv)));
    ds_status rc = filter_reorder(b, &op->conv, op->filter, oihw, 1);
    ds_backend_free(b, oihw); /* after the reorder: ds_backend_free waits for the stream */
    return rc;
}

ds_status ds_conv_forward_create(ds_op **op_out, ds_backend *backend, const conv_desc *desc, const float *weight,
                                 const float *bias)
{
    DS_TRY(ds_conv_desc_check(desc));
    ds_op *op;
    DS_TRY(op_alloc(&op, backend));
    return op_finish(op_out, op, conv_forward_build(op, desc, weight, bias));
}

ds_status ds_conv_forward(ds_op *op, const float *src, float *dst)
{
    return conv_plan_forward(&op->conv, op->backend, dst, src, op->filter, op->bias, op->conv.d.post);
}

/* ---- batch norm + ReLU (inference) ---- */

static ds_status batchnorm_relu_build(ds_op *op, const float *gamma, const float *beta, const float *mean,
                                      const float *variance, float epsilon)
{
    int channels = op->channels;
    float *folded = (float *)malloc(2 * (size_t)channels * sizeof(float));
    if (!folded)
        return ds_fail(DS_ERR_NOMEM, "out of memory");
    float *scale = folded, *shift = folded + channels;
    for (int c = 0; c < channels; c++) {
        double s = gamma[c] / sqrt((double)variance[c] + epsilon);
        scale[c] = (float)s;
        shift[c] = (float)(beta[c] - mean[c] * s);
    }
    ds_status rc = device_copy_of(op->backend, &op->scale, scale, channels);
    if (rc == DS_OK)
        rc = device_copy_of(op->backend, &op->shift, shift, channels);
    free(folded);
    return rc;
}

ds_status ds_batchnorm_relu_forward_create(ds_op **op_out, ds_backend *backend, int batch, int channels, int height,
                                           int width, const float *gamma, const float *beta, const float *mean,
                                           const float *variance, float epsilon)
{
    if (batch < 1 || channels < 1 || height < 1 || width < 1)
        return ds_fail(DS_ERR_VALUE, "batch norm: inconsistent shape");
    ds_op *op;
    DS_TRY(op_alloc(&op, backend));
    op->channels = channels;
    op->values = (size_t)batch * height * width * channels;
    return op_finish(op_out, op, batchnorm_relu_build(op, gamma, beta, mean, variance, epsilon));
}

ds_status ds_batchnorm_relu_forward(ds_op *op, const float *src, float *dst)
{
    scale_shift_relu_kernel<<<ds_blocks(op->values), DS_THREADS, 0, op->backend->stream>>>(
        dst, src, op->scale, op->shift, op->values, op->channels);
    LAUNCH_TRY();
    return DS_OK;
}

/* ---- max pooling ---- */

ds_status ds_maxpool_forward_create(ds_op **op_out, ds_backend *backend, int batch, int channels, int height,
                                    int width, int out_height, int out_width, int kernel, int stride, int pad_before,
                                    int pad_after)
{
    pool_shape s;
    DS_TRY(pool_shape_make(&s, batch, channels, height, width, out_height, out_width, kernel, stride, pad_before,
                           pad_after));
    ds_op *op;
    DS_TRY(op_alloc(&op, backend));
    op->pool = s;
    *op_out = op;
    return DS_OK;
}

ds_status ds_maxpool_forward(ds_op *op, const float *src, float *dst)
{
    return maxpool_launch(op->backend, &op->pool, dst, NULL, src);
}

/* ---- channel concatenation ---- */

ds_status ds_concat_forward_create(ds_op **op_out, ds_backend *backend, int batch, int height, int width, int n_inputs,
                                   const int *channels)
{
    if (n_inputs < 1 || n_inputs > CONCAT_MAX_INPUTS)
        return ds_fail(DS_ERR_VALUE, "concat: %d inputs (1..%d supported)", n_inputs, CONCAT_MAX_INPUTS);
    concat_inputs layout = {};
    for (int i = 0; i < n_inputs; i++) {
        if (channels[i] < 1)
            return ds_fail(DS_ERR_VALUE, "concat: input %d has %d channels", i, channels[i]);
        layout.channels[i] = channels[i];
        layout.total_channels += channels[i];
    }
    if (batch < 1 || height < 1 || width < 1)
        return ds_fail(DS_ERR_VALUE, "concat: inconsistent shape");
    layout.n_inputs = n_inputs;
    ds_op *op;
    DS_TRY(op_alloc(&op, backend));
    op->concat = layout;
    op->pixels = (size_t)batch * height * width;
    *op_out = op;
    return DS_OK;
}

ds_status ds_concat_forward(ds_op *op, const float *const *srcs, float *dst)
{
    concat_inputs in = op->concat;
    for (int i = 0; i < in.n_inputs; i++)
        in.src[i] = srcs[i];
    size_t count = op->pixels * in.total_channels;
    concat_kernel<<<ds_blocks(count), DS_THREADS, 0, op->backend->stream>>>(dst, in, count);
    LAUNCH_TRY();
    return DS_OK;
}

/* ================================================================ training ops */

struct ds_train_op {
    ds_backend *backend;
    /* convolution */
    conv_plan conv;
    float *filter;                  /* the last forward's weights in KRSC, for its backward */
    int need_dsrc;
    /* batch norm */
    cudnnTensorDescriptor_t bn_data, bn_params;
    float epsilon;
    int relu, training;
    size_t values;
    int channels;
    float *saved_mean, *saved_inv_variance; /* cuDNN's statistics of the last forward, for its backward */
    /* max pooling */
    pool_shape pool;
    unsigned char *winner;          /* [batch, out_h, out_w, channels]: the window offset of each maximum */
};

void ds_train_op_destroy(ds_train_op *op)
{
    if (!op)
        return;
    cudaStreamSynchronize(op->backend->stream); /* queued work may still use the op's buffers */
    conv_plan_destroy(&op->conv);
    if (op->bn_data)
        cudnnDestroyTensorDescriptor(op->bn_data);
    if (op->bn_params)
        cudnnDestroyTensorDescriptor(op->bn_params);
    cudaFree(op->filter);
    cudaFree(op->saved_mean);
    cudaFree(op->saved_inv_variance);
    cudaFree(op->winner);
    free(op);
}

static ds_status train_op_alloc(ds_train_op **op, ds_backend *backend)
{
    *op = (ds_train_op *)calloc(1, sizeof **op);
    if (!*op)
        return ds_fail(DS_ERR_NOMEM, "out of memory");
    (*op)->backend = backend;
    return DS_OK;
}

static ds_status train_op_finish(ds_train_op **op_out, ds_train_op *op, ds_status rc)
{
    if (rc != DS_OK) {
        ds_train_op_destroy(op);
        return rc;
    }
    *op_out = op;
    return DS_OK;
}

/* ---- convolution and transposed convolution ---- */

static ds_status conv_train_build(ds_train_op *op, const conv_desc *d, int need_dsrc)
{
    op->need_dsrc = need_dsrc;
    DS_TRY(conv_plan_create(&op->conv, op->backend, d, 1, need_dsrc));
    return device_alloc((void **)&op->filter, filter_count(&op->conv) * sizeof(float));
}

ds_status ds_conv_train_create(ds_train_op **op_out, ds_backend *backend, const conv_desc *desc, int need_dsrc)
{
    if (desc->post)
        return ds_fail(DS_ERR_VALUE, "training convolution: post-ops are not supported");
    DS_TRY(ds_conv_desc_check(desc));
    ds_train_op *op;
    DS_TRY(train_op_alloc(&op, backend));
    return train_op_finish(op_out, op, conv_train_build(op, desc, need_dsrc));
}

ds_status ds_conv_train_forward(ds_train_op *op, float *dst, const float *src, const float *weight, const float *bias)
{
    DS_TRY(filter_reorder(op->backend, &op->conv, op->filter, weight, 1));
    return conv_plan_forward(&op->conv, op->backend, dst, src, op->filter, bias, 0);
}

/* dweight and dbias from x (the forward convolution's input, padded) and dy (the gradient at its output) */
static ds_status conv_filter_gradient(ds_train_op *op, const conv_regions *r, float *dweight, float *dbias,
                                      const float *x, const float *dy, const float *ddst)
{
    ds_backend *b = op->backend;
    const conv_plan *p = &op->conv;
    const conv_pass *bf = &p->pass[PASS_BACKWARD_FILTER];
    const float one = 1.0f, zero = 0.0f;
    CUDNN_TRY(cudnnConvolutionBackwardFilter(b->cudnn, &one, p->x, x, p->y, dy, bf->conv,
                                             (cudnnConvolutionBwdFilterAlgo_t)bf->algo, r->cudnn, bf->workspace_bytes,
                                             &zero, p->w, r->dfilter));
    DS_TRY(filter_reorder(b, p, dweight, r->dfilter, 0));
    return channel_sums(b, dbias, r->bias_partials, ddst,
                        (size_t)p->d.batch * p->d.out_height * p->d.out_width, p->d.out_channels);
}

ds_status ds_conv_backward(ds_train_op *op, float *dsrc, float *dweight, float *dbias, const float *ddst,
                           const float *src)
{
    if (dsrc && !op->need_dsrc)
        return ds_fail(DS_ERR_VALUE, "convolution backward: built without the data gradient");
    if (dweight && !dbias)
        return ds_fail(DS_ERR_VALUE, "convolution backward: dweight without dbias");
    ds_backend *b = op->backend;
    const conv_plan *p = &op->conv;
    conv_regions r = regions_of(p, b);
    const float one = 1.0f, zero = 0.0f;
    if (!p->d.transposed) {
        /* x = src (padded), dy = ddst */
        if (dsrc) {
            const conv_pass *bd = &p->pass[PASS_BACKWARD_DATA];
            float *dx = has_padding(p) ? r.padded : dsrc;
            CUDNN_TRY(cudnnConvolutionBackwardData(b->cudnn, &one, p->w, op->filter, p->y, ddst, bd->conv,
                                                   (cudnnConvolutionBwdDataAlgo_t)bd->algo, r.cudnn,
                                                   bd->workspace_bytes, &zero, p->x, dx));
            if (dx != dsrc)
                DS_TRY(conv_epilogue(b, dsrc, dx, p->x_side, NULL, 0, 0)); /* crop */
        }
        if (dweight) {
            const float *x = src;
            if (has_padding(p)) {
                DS_TRY(pad_copy(b, r.padded, src, p->x_side));
                x = r.padded;
            }
            DS_TRY(conv_filter_gradient(op, &r, dweight, dbias, x, ddst, ddst));
        }
        return DS_OK;
    }
    /* transposed: x = ddst (padded), y = src; the data gradient is the forward convolution of x */
    const float *x = ddst;
    if (has_padding(p) && (dsrc || dweight)) {
        DS_TRY(pad_copy(b, r.padded, ddst, p->x_side));
        x = r.padded;
    }
    if (dsrc) {
        const conv_pass *f = &p->pass[PASS_FORWARD];
        CUDNN_TRY(cudnnConvolutionForward(b->cudnn, &one, p->x, x, p->w, op->filter, f->conv,
                                          (cudnnConvolutionFwdAlgo_t)f->algo, r.cudnn, f->workspace_bytes, &zero,
                                          p->y, dsrc));
    }
    if (dweight)
        DS_TRY(conv_filter_gradient(op, &r, dweight, dbias, x, src, ddst));
    return DS_OK;
}

/* ---- batch norm (+ ReLU) on cuDNN, statistics passed per call ---- */

static ds_status batchnorm_train_build(ds_train_op *op, int batch, int channels, int height, int width)
{
    CUDNN_TRY(nhwc_tensor(&op->bn_data, batch, channels, height, width));
    CUDNN_TRY(cudnnCreateTensorDescriptor(&op->bn_params));
    CUDNN_TRY(cudnnDeriveBNTensorDescriptor(op->bn_params, op->bn_data, CUDNN_BATCHNORM_SPATIAL));
    if (op->training) {
        DS_TRY(device_alloc((void **)&op->saved_mean, channels * sizeof(float)));
        DS_TRY(device_alloc((void **)&op->saved_inv_variance, channels * sizeof(float)));
    }
    return DS_OK;
}

ds_status ds_batchnorm_train_create(ds_train_op **op_out, ds_backend *backend, int batch, int channels, int height,
                                    int width, float epsilon, int relu, int mode)
{
    if (batch < 1 || channels < 1 || height < 1 || width < 1)
        return ds_fail(DS_ERR_VALUE, "batch norm: inconsistent shape");
    /* cuDNN's batch norm backward always differentiates through the batch statistics; a frozen one
     * needs its own kernels, not written until a GPU can test them */
    if (mode == DS_BN_FROZEN)
        return ds_fail(DS_ERR_VALUE, "a frozen batch norm (batch_norm='frozen') is not available on the CUDA backend "
                                     "yet: train with batch_norm='batch' on the GPU, or on the CPU");
    if (mode != DS_BN_INFERENCE && mode != DS_BN_BATCH_STATISTICS)
        return ds_fail(DS_ERR_VALUE, "batch norm: unknown mode %d", mode);
    int training = mode == DS_BN_BATCH_STATISTICS;
    if (!(epsilon >= CUDNN_BN_MIN_EPSILON))
        return ds_fail(DS_ERR_VALUE, "batch norm: epsilon %g below cuDNN's minimum %g", epsilon, CUDNN_BN_MIN_EPSILON);
    ds_train_op *op;
    DS_TRY(train_op_alloc(&op, backend));
    op->epsilon = epsilon;
    op->relu = relu;
    op->training = training;
    op->channels = channels;
    op->values = (size_t)batch * height * width * channels;
    return train_op_finish(op_out, op, batchnorm_train_build(op, batch, channels, height, width));
}

ds_status ds_batchnorm_train_forward(ds_train_op *op, float *dst, float *mean, float *variance, const float *src,
                                     const float *gamma, const float *beta)
{
    ds_backend *b = op->backend;
    const float one = 1.0f, zero = 0.0f;
    if (op->training) {
        /* Averaging factor 1 makes cuDNN's running statistics this batch's, but it still weighs the old
         * contents by 0, and 0 * NaN (a diverged step) would stay NaN: start from zeros. */
        CUDA_TRY(cudaMemsetAsync(mean, 0, op->channels * sizeof(float), b->stream));
        CUDA_TRY(cudaMemsetAsync(variance, 0, op->channels * sizeof(float), b->stream));
        CUDNN_TRY(cudnnBatchNormalizationForwardTraining(b->cudnn, CUDNN_BATCHNORM_SPATIAL, &one, &zero, op->bn_data,
                                                         src, op->bn_data, dst, op->bn_params, gamma, beta, 1.0, mean,
                                                         variance, op->epsilon, op->saved_mean,
                                                         op->saved_inv_variance));
        size_t pixels = op->values / op->channels;
        biased_variance_kernel<<<ds_blocks(op->channels), DS_THREADS, 0, b->stream>>>(variance, op->channels, pixels);
        LAUNCH_TRY();
    } else {
        CUDNN_TRY(cudnnBatchNormalizationForwardInference(b->cudnn, CUDNN_BATCHNORM_SPATIAL, &one, &zero, op->bn_data,
                                                          src, op->bn_data, dst, op->bn_params, gamma, beta, mean,
                                                          variance, op->epsilon));
    }
    return op->relu ? ds_relu_inplace(b, dst, op->values) : DS_OK;
}

ds_status ds_batchnorm_backward(ds_train_op *op, float *dsrc, float *dgamma, float *dbeta, float *ddst,
                                const float *src, const float *mean, const float *variance, const float *gamma,
                                const float *beta)
{
    if (!op->training)
        return ds_fail(DS_ERR_VALUE, "batch norm backward: the op was built for inference");
    ds_backend *b = op->backend;
    if (op->relu) {
        batchnorm_relu_mask_kernel<<<ds_blocks(op->values), DS_THREADS, 0, b->stream>>>(
            ddst, src, op->saved_mean, op->saved_inv_variance, gamma, beta, op->values, op->channels);
        LAUNCH_TRY();
    }
    const float one = 1.0f, zero = 0.0f;
    CUDNN_TRY(cudnnBatchNormalizationBackward(b->cudnn, CUDNN_BATCHNORM_SPATIAL, &one, &zero, &one, &zero,
                                              op->bn_data, src, op->bn_data, ddst, op->bn_data, dsrc, op->bn_params,
                                              gamma, dgamma, dbeta, op->epsilon, op->saved_mean,
                                              op->saved_inv_variance));
    return DS_OK;
}

/* ---- max pooling with the winners kept for the backward ---- */

ds_status ds_maxpool_train_create(ds_train_op **op_out, ds_backend *backend, int batch, int channels, int height,
                                  int width, int out_height, int out_width, int kernel, int stride, int pad_before,
                                  int pad_after)
{
    pool_shape s;
    DS_TRY(pool_shape_make(&s, batch, channels, height, width, out_height, out_width, kernel, stride, pad_before,
                           pad_after));
    ds_train_op *op;
    DS_TRY(train_op_alloc(&op, backend));
    op->pool = s;
    size_t outputs = (size_t)s.n * s.out_h * s.out_w * s.c;
    return train_op_finish(op_out, op, device_alloc((void **)&op->winner, outputs));
}

ds_status ds_maxpool_train_forward(ds_train_op *op, float *dst, const float *src)
{
    return maxpool_launch(op->backend, &op->pool, dst, op->winner, src);
}

ds_status ds_maxpool_backward(ds_train_op *op, float *dsrc, const float *ddst)
{
    const pool_shape *s = &op->pool;
    size_t count = (size_t)s->n * s->h * s->w * s->c;
    maxpool_backward_kernel<<<ds_blocks(count), DS_THREADS, 0, op->backend->stream>>>(dsrc, ddst, op->winner, *s,
                                                                                       count);
    LAUNCH_TRY();
    return DS_OK;
}
