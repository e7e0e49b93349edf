/* A stand-in for libnccl.so for cuda/tests/nccl.rs. STUB_SCENARIO:
 *   "async":   ncclCommGetAsyncError reports ncclRemoteError from its 3rd call (a peer died);
 *   "silent":  no error is ever reported (a peer stopped without failing);
 *   "healthy": no error; the stub driver's stream finishes on its own.
 * ncclCommAbort marks the stub driver's work done (NCCL's kernels return when aborted) and is
 * counted, as is ncclCommDestroy: stub_aborts() and stub_destroys() tell the test. */
#include <stdlib.h>
#include <string.h>

typedef int ncclResult_t;
enum { ncclSuccess = 0, ncclRemoteError = 6, ncclInProgress = 7 };
typedef struct { char internal[128]; } ncclUniqueId;

extern int stub_work_aborted; /* in the stub libcuda, loaded first */
static int comm_token, polls, aborts, destroys;

int stub_aborts(void) { return aborts; }
int stub_destroys(void) { return destroys; }

ncclResult_t ncclGetVersion(int *v) { *v = 22809; return ncclSuccess; }
ncclResult_t ncclGetUniqueId(ncclUniqueId *id) { memset(id, 7, sizeof *id); return ncclSuccess; }
ncclResult_t ncclCommInitRank(void **comm, int n, ncclUniqueId id, int rank) { (void)n; (void)id; (void)rank; *comm = &comm_token; return ncclSuccess; }
ncclResult_t ncclCommGetAsyncError(void *comm, ncclResult_t *e) {
    const char *s = getenv("STUB_SCENARIO");
    (void)comm;
    *e = (s && strcmp(s, "async") == 0 && ++polls >= 3) ? ncclRemoteError : ncclSuccess;
    return ncclSuccess;
}
ncclResult_t ncclCommAbort(void *comm) { (void)comm; aborts++; stub_work_aborted = 1; return ncclSuccess; }
ncclResult_t ncclCommDestroy(void *comm) { (void)comm; destroys++; return ncclSuccess; }
const char *ncclGetErrorString(ncclResult_t r) { return r == ncclRemoteError ? "remote process exited or there was a network error" : "stub"; }
const char *ncclGetLastError(void *comm) { (void)comm; return "stub: rank 1 unreachable"; }
