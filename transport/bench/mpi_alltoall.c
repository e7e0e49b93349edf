/* Open MPI MPI_Alltoall timing in the shape of `ember bench a2a`: for each size (bytes per
 * peer) from -b to -e by factor -f: -w warm-up iterations, barrier, -n timed iterations; prints
 * the max over ranks of the mean time per iteration and algbw/busbw as nccl-tests does.
 * Build: mpicc -O2 -o mpi_alltoall mpi_alltoall.c
 * Run:   mpirun --allow-run-as-root --oversubscribe --bind-to core -np 2 ./mpi_alltoall 1024 16777216 4 20 2
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, n;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    size_t minb = argc > 1 ? strtoull(argv[1], 0, 10) : 1024;
    size_t maxb = argc > 2 ? strtoull(argv[2], 0, 10) : 16 << 20;
    size_t fac = argc > 3 ? strtoull(argv[3], 0, 10) : 2;
    int iters = argc > 4 ? atoi(argv[4]) : 20;
    int warm = argc > 5 ? atoi(argv[5]) : 2;
    char *s = malloc(maxb * n), *r = malloc(maxb * n);
    memset(s, rank + 1, maxb * n);
    memset(r, 0, maxb * n);
    if (rank == 0) printf("#%11s %11s %6s %11s %11s %11s\n", "size", "count", "type", "time(us)", "algbw(GB/s)", "busbw(GB/s)");
    for (size_t b = minb; b <= maxb; b *= fac) {
        int cnt = (int)(b / 4);
        for (int i = 0; i < warm; i++) MPI_Alltoall(s, cnt, MPI_FLOAT, r, cnt, MPI_FLOAT, MPI_COMM_WORLD);
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (int i = 0; i < iters; i++) MPI_Alltoall(s, cnt, MPI_FLOAT, r, cnt, MPI_FLOAT, MPI_COMM_WORLD);
        double us = (MPI_Wtime() - t0) * 1e6 / iters, mx;
        MPI_Reduce(&us, &mx, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
        /* check: block from peer p is filled with p + 1 */
        int bad = 0;
        for (int p = 0; p < n; p++) bad += r[(size_t)p * b] != (char)(p + 1) || r[(size_t)p * b + b - 1] != (char)(p + 1);
        double alg = (double)b * n / mx / 1e3;
        if (rank == 0) printf("%12zu %11d %6s %11.1f %11.3f %11.3f%s\n", b, cnt, "float", mx, alg, alg * (n - 1) / n, bad ? " WRONG" : "");
    }
    free(s); free(r);
    MPI_Finalize();
    return 0;
}
