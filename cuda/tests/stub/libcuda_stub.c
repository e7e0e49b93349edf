/* A stand-in for the CUDA driver (libcuda.so) for cuda/tests/nccl.rs: one device, one context,
 * streams that are plain handles. STUB_SCENARIO decides what the stream's work does:
 *   "healthy": cuStreamQuery reports "not ready" 5 times, then done;
 *   anything else: the work never finishes (a peer died mid-collective) until the stub NCCL
 *   communicator is aborted.
 * cuStreamSynchronize never returns while the work is unfinished, like the real driver waiting
 * for a kernel that waits for a dead peer. Built by the test with `cc -shared -fPIC`. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
enum { CUDA_SUCCESS = 0, CUDA_ERROR_NOT_READY = 600 };

static __thread void *current_ctx;
static int ctx_token, stream_token;
static int queries;

/* Set by the stub NCCL when a communicator is aborted (its kernels return). */
int stub_work_aborted;

static int work_done(void) {
    const char *s = getenv("STUB_SCENARIO");
    if (stub_work_aborted) return 1;
    if (s && strcmp(s, "healthy") == 0) return ++queries > 5;
    return 0;
}

CUresult cuInit(unsigned flags) { (void)flags; return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return CUDA_SUCCESS; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return CUDA_SUCCESS; }
CUresult cuDeviceGet(int *d, int ordinal) { *d = ordinal; return CUDA_SUCCESS; }
CUresult cuDeviceGetName(char *name, int len, int dev) { (void)dev; strncpy(name, "stub GPU", len); return CUDA_SUCCESS; }
CUresult cuDeviceGetAttribute(int *v, int attr, int dev) { (void)attr; (void)dev; *v = 0; return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev) { (void)dev; *ctx = &ctx_token; return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRelease(int dev) { (void)dev; return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRelease_v2(int dev) { (void)dev; return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(void **ctx) { *ctx = current_ctx; return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(void *ctx) { current_ctx = ctx; return CUDA_SUCCESS; }
CUresult cuCtxSynchronize(void) { while (!work_done()) usleep(1000); return CUDA_SUCCESS; }
CUresult cuStreamCreate(void **s, unsigned flags) { (void)flags; *s = &stream_token; return CUDA_SUCCESS; }
CUresult cuStreamDestroy(void *s) { (void)s; return CUDA_SUCCESS; }
CUresult cuStreamDestroy_v2(void *s) { (void)s; return CUDA_SUCCESS; }
CUresult cuStreamQuery(void *s) { (void)s; return work_done() ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY; }
CUresult cuStreamSynchronize(void *s) { (void)s; while (!work_done()) usleep(1000); return CUDA_SUCCESS; }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; *s = "stub error"; return CUDA_SUCCESS; }
CUresult cuGetErrorName(CUresult e, const char **s) { (void)e; *s = "CUDA_ERROR_STUB"; return CUDA_SUCCESS; }
CUresult cuMemAlloc_v2(unsigned long long *p, size_t n) { *p = (unsigned long long)malloc(n ? n : 1); return CUDA_SUCCESS; }
CUresult cuMemFree_v2(unsigned long long p) { free((void *)p); return CUDA_SUCCESS; }
