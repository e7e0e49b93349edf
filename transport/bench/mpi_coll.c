/* Open MPI's MPI_Alltoall, MPI_Allreduce (f32 sum) and a ping-pong of MPI_Send/MPI_Recv timed
 * as `ember bench a2a|allreduce|pingpong` times Ember's, printing the same JSON rows
 * (`ember bench ... --json`), so one script can set them side by side
 * (tools/experiments/transport_vs_mpi.sh).
 *
 *   mpi_coll a2a|allreduce|pingpong MIN MAX FACTOR ITERS WARMUP [per-op]
 *
 * For each size from MIN to MAX bytes by FACTOR (a2a: bytes per peer; allreduce: buffer bytes;
 * pingpong: message bytes, rank 0 to rank 1 and back, the time being half the round trip, OSU's
 * osu_latency):
 * WARMUP untimed operations, then either back-to-back (one barrier, ITERS operations, the
 * slowest rank's mean per operation: nccl-tests' and OSU's method) or, with `per-op`, ITERS
 * times a barrier and one operation timed alone (the median over operations of the slowest
 * rank's time: how a training step, which issues each collective cold after compute, sees it).
 * algbw and busbw as nccl-tests: a2a algbw = size·n / time, busbw = algbw·(n−1)/n; allreduce
 * algbw = size / time, busbw = algbw·2(n−1)/n; pingpong algbw = busbw = size / time. The output
 * is checked after timing.
 *
 * Build: mpicc -O2 -o mpi_coll transport/bench/mpi_coll.c
 * Run:   mpirun --allow-run-as-root --oversubscribe --bind-to core -np 2 ./mpi_coll a2a 1024 16777216 2 50 10 per-op
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

enum { A2A, ALLREDUCE, PINGPONG };

static void run(int which, int rank, const float *s, float *r, int cnt) {
    if (which == A2A)
        MPI_Alltoall(s, cnt, MPI_FLOAT, r, cnt, MPI_FLOAT, MPI_COMM_WORLD);
    else if (which == ALLREDUCE)
        MPI_Allreduce(s, r, cnt, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    else if (rank == 0) {
        MPI_Send(s, cnt, MPI_FLOAT, 1, 0, MPI_COMM_WORLD);
        MPI_Recv(r, cnt, MPI_FLOAT, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else if (rank == 1) {
        MPI_Recv(r, cnt, MPI_FLOAT, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        MPI_Send(s, cnt, MPI_FLOAT, 0, 0, MPI_COMM_WORLD);
    }
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, n;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    int which = argc < 2 ? -1 : !strcmp(argv[1], "a2a") ? A2A : !strcmp(argv[1], "allreduce") ? ALLREDUCE : !strcmp(argv[1], "pingpong") ? PINGPONG : -1;
    if (argc < 7 || which < 0 || (which == PINGPONG && n < 2)) {
        if (rank == 0) fprintf(stderr, "usage: mpi_coll a2a|allreduce|pingpong MIN MAX FACTOR ITERS WARMUP [per-op] (pingpong: 2 ranks or more)\n");
        MPI_Finalize();
        return 2;
    }
    int a2a = which == A2A;
    size_t minb = strtoull(argv[2], 0, 10), maxb = strtoull(argv[3], 0, 10), fac = strtoull(argv[4], 0, 10);
    int iters = atoi(argv[5]), warm = atoi(argv[6]);
    int per_op = argc > 7 && !strcmp(argv[7], "per-op");
    if (minb < 4 || maxb < minb || maxb > (1ull << 30) || fac < 2 || iters < 1 || iters > 100000 || warm < 0) {
        if (rank == 0) fprintf(stderr, "mpi_coll: need 4 <= MIN <= MAX <= 1 GiB, FACTOR >= 2, 1 <= ITERS <= 100000\n");
        MPI_Finalize();
        return 2;
    }
    size_t len = a2a ? maxb / 4 * n : maxb / 4; /* floats per buffer */
    float *s = malloc(len * 4), *r = malloc(len * 4);
    double *t = malloc(sizeof(double) * iters);
    if (!s || !r || !t) MPI_Abort(MPI_COMM_WORLD, 1);
    for (size_t i = 0; i < len; i++) s[i] = (float)(rank + 1);
    for (size_t b = minb; b <= maxb; b *= fac) {
        int cnt = (int)(b / 4);
        for (int i = 0; i < warm; i++) run(which, rank, s, r, cnt);
        double us;
        if (per_op) {
            for (int i = 0; i < iters; i++) {
                MPI_Barrier(MPI_COMM_WORLD);
                double t0 = MPI_Wtime();
                run(which, rank, s, r, cnt);
                double one = (MPI_Wtime() - t0) * 1e6;
                MPI_Allreduce(&one, &t[i], 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
            }
            qsort(t, iters, sizeof(double), cmp);
            us = iters % 2 ? t[iters / 2] : (t[iters / 2 - 1] + t[iters / 2]) / 2;
        } else {
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            for (int i = 0; i < iters; i++) run(which, rank, s, r, cnt);
            double mine = (MPI_Wtime() - t0) * 1e6 / iters;
            MPI_Allreduce(&mine, &us, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        }
        if (which == PINGPONG) us /= 2; /* one way: half the round trip */
        /* check: a2a block from peer p holds p + 1; allreduce: n(n+1)/2 everywhere; pingpong:
         * ranks 0 and 1 hold the other's rank + 1 */
        memset(r, 0, len * 4);
        run(which, rank, s, r, cnt);
        long bad = 0;
        size_t checked = which == PINGPONG && rank > 1 ? 0 : (size_t)cnt * (a2a ? n : 1);
        for (size_t i = 0; i < checked; i++) {
            float want = a2a ? (float)(i / cnt + 1) : which == ALLREDUCE ? (float)n * (n + 1) / 2 : (float)(2 - rank);
            bad += r[i] != want;
        }
        long wrong;
        MPI_Allreduce(&bad, &wrong, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
        double alg = (double)b * (a2a ? n : 1) / us / 1e3;
        double bus = alg * (a2a ? (double)(n - 1) / n : which == ALLREDUCE ? 2.0 * (n - 1) / n : 1.0);
        if (rank == 0)
            printf("{\"collective\":\"%s\",\"size\":%zu,\"count\":%d,\"type\":\"float\",\"time_us\":%.3f,\"algbw\":%.6f,"
                   "\"busbw\":%.6f,\"wrong\":%ld,\"ranks\":%d,\"transport\":\"openmpi\",\"method\":\"%s\"}\n",
                   argv[1], b, cnt, us, alg, bus, wrong, n, per_op ? "per_op" : "back_to_back");
    }
    free(s); free(r); free(t);
    MPI_Finalize();
    return 0;
}
