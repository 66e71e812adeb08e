/* cuda_backend.h - what the two halves of the GPU backend share (ops_cuda.cu: the cuDNN ops and
 * backend memory; kernels_cuda.cu: our own kernels): the backend struct, error checking that
 * turns CUDA and cuDNN failures into ds_status, and launch sizes. Private to those files. */
#ifndef DS_CUDA_BACKEND_H
#define DS_CUDA_BACKEND_H

#include <math.h>

#include <cuda_runtime.h>
#include <cudnn.h>

extern "C" {
#include "ops.h"
}

struct ds_backend {
    int device;
    int math_mode;              /* DS_MATH_FLOAT32 or DS_MATH_TF32 */
    cudaStream_t stream;        /* every op and copy of this backend runs on it, in order */
    cudnnHandle_t cudnn;
    void *workspace;            /* shared by the ops (they run one after another on the stream) */
    size_t workspace_bytes;     /* grown only while ops are created, never during execution */
    double *scratch;            /* small reductions of the kernels (e.g. the loss), DS_SCRATCH_DOUBLES */
};

#define DS_SCRATCH_DOUBLES 4096

#define CUDA_TRY(call)                                                                                         \
    do {                                                                                                       \
        cudaError_t cuda_rc_ = (call);                                                                         \
        if (cuda_rc_ != cudaSuccess)                                                                           \
            return ds_fail(DS_ERR_BACKEND, "CUDA: %s: %s (%s:%d)", #call, cudaGetErrorString(cuda_rc_),        \
                           __FILE__, __LINE__);                                                                \
    } while (0)

#define CUDNN_TRY(call)                                                                                        \
    do {                                                                                                       \
        cudnnStatus_t cudnn_rc_ = (call);                                                                      \
        if (cudnn_rc_ != CUDNN_STATUS_SUCCESS)                                                                 \
            return ds_fail(DS_ERR_BACKEND, "cuDNN: %s: %s (%s:%d)", #call, cudnnGetErrorString(cudnn_rc_),     \
                           __FILE__, __LINE__);                                                                \
    } while (0)

/* After a kernel launch: a bad configuration is reported at once, faults at the next synchronisation. */
#define LAUNCH_TRY() CUDA_TRY(cudaGetLastError())

#define DS_THREADS 256
static inline unsigned ds_blocks(size_t n)
{
    size_t blocks = (n + DS_THREADS - 1) / DS_THREADS;
    return (unsigned)(blocks < 65535u * 32u ? (blocks ? blocks : 1) : 65535u * 32u); /* grid-stride loops do the rest */
}

/* i runs over [0, n), shared by `workers` blocks of which this block is number `worker`: neighbouring
 * threads take neighbouring values (coalesced), and a grid of bounded size covers any n. */
#define STRIDED_LOOP(i, n, worker, workers)                                                                    \
    for (size_t i = (size_t)(worker) * blockDim.x + threadIdx.x; i < (n); i += (size_t)(workers) * blockDim.x)
#define GRID_STRIDE_LOOP(i, n) STRIDED_LOOP(i, n, blockIdx.x, gridDim.x)

/* kernels.c's sigmoidf, stable for either sign. Its expf (glibc) is within 0.502 ulp, CUDA's expf within
 * 2: exp in double rounded to float gives glibc's value in almost every case, which matters where the
 * loss compares probabilities for equality (ties of the maximum). */
static __device__ inline float ds_sigmoid(float z)
{
    if (z >= 0.0f)
        return 1.0f / (1.0f + (float)exp(-(double)z));
    float e = (float)exp((double)z);
    return e / (1.0f + e);
}

/* Makes the shared workspace at least `bytes` long (called while ops are created). */
ds_status ds_backend_reserve_workspace(ds_backend *backend, size_t bytes);

#endif
