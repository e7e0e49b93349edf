/* Ember C ABI example: train a small DLRM for a few steps on synthetic data made here, print
 * the metrics, save and reload a checkpoint, run the transport microbenchmark, and check the
 * error paths. One program, three ways to run it:
 *
 *   ./train [--steps S] [checkpoint-dir]            one process, the whole model
 *   ./train --ranks 4 [checkpoint-dir]              4 in-process ranks, one thread each
 *   ember launch -n 4 -- ./train checkpoint-dir     4 processes, one rank each (1x4 grid)
 *
 * Without checkpoint-dir the checkpoint goes to a fresh temporary folder ($TMPDIR, else /tmp),
 * removed at the end; a directory given is kept. Processes of one job must share the folder,
 * so under a launcher it must be given.
 *
 * Every rank builds the same global batch of BATCH samples for each step and feeds its own
 * slice (ember_engine_info: local_batch_size samples from sample_start); the loss and metrics
 * printed are global, so every rank prints the same numbers.
 *
 * Build (after `cargo build -p ember-ffi`; TARGET is the cargo target dir, e.g. target/debug):
 *   gcc -std=c99 -Wall -Wextra -pthread -Iengine/include docs/examples/train.c \
 *       -L$TARGET -Wl,-rpath,$TARGET -lember -o train
 * or, with libember installed (tools/install-capi.sh PREFIX):
 *   gcc -std=c99 -pthread docs/examples/train.c $(pkg-config --cflags --libs ember) -o train
 * Exit status 0 when every check passed. */
#define _XOPEN_SOURCE 700 /* POSIX 2008 with the XSI nftw() */
#include <ftw.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ember.h"

#define NUM_DENSE 4
#define NUM_TABLES 3
#define ROWS 100
#define BATCH 64      /* global batch: the config's batch_size */
#define EVAL_N 256    /* evaluation samples, split over the ranks */
#define MAX_BAG 3     /* ids per bag: 1 to MAX_BAG */
#define MAX_SAMPLES EVAL_N
#define MAX_RANKS 64

static const char *CONFIG =
    "batch_size = 64\n"
    "seed = 7\n"
    "[model]\n"
    "num_dense = 4\n"
    "bottom_mlp = [16, 8]\n"
    "top_mlp = [16, 1]\n"
    "interaction = { kind = \"dot\" }\n"
    "[[model.tables]]\n"
    "rows = 100\n"
    "dim = 8\n"
    "[[model.tables]]\n"
    "rows = 100\n"
    "dim = 8\n"
    "pooling = \"mean\"\n"
    "[[model.tables]]\n"
    "rows = 100\n"
    "dim = 8\n"
    "[optim]\n"
    "embedding = { kind = \"row_wise_adagrad\", lr = 0.1, eps = 1e-8 }\n"
    "dense = { kind = \"adagrad\", lr = 0.05, eps = 1e-8 }\n";

/* One rank's run: its engine, its settings and its failure count. */
typedef struct {
    ember_engine *eng;
    const char *ckpt;
    int steps;
    int failures;
    size_t rank;
} rank_ctx;

#define CHECK(ctx, cond, ...)                                                   \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "rank %zu: CHECK FAILED (line %d): ", (ctx)->rank, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                                       \
            fprintf(stderr, "\n");                                              \
            (ctx)->failures++;                                                  \
        }                                                                       \
    } while (0)

/* Expect status `want` from `got`, with a non-empty message for errors. */
static void expect(rank_ctx *ctx, const char *what, ember_status got, ember_status want) {
    const char *msg = ember_last_error();
    CHECK(ctx, got == want, "%s: got %s, want %s (%s)", what, ember_status_name(got), ember_status_name(want), msg);
    if (want != EMBER_STATUS_OK) {
        CHECK(ctx, msg != NULL && msg[0] != '\0', "%s: empty error message", what);
        if (ctx->rank == 0) printf("  ok  %-36s -> %s: %s\n", what, ember_status_name(got), msg);
    }
}

typedef struct {
    size_t n; /* samples */
    float dense[MAX_SAMPLES * NUM_DENSE];
    float labels[MAX_SAMPLES];
    uint32_t lengths[NUM_TABLES * MAX_SAMPLES];
    uint64_t ids[NUM_TABLES * MAX_SAMPLES * MAX_BAG];
    size_t num_ids;
} batch;

/* A deterministic generator (64-bit LCG). */
static uint32_t next_u32(uint64_t *state) {
    *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(*state >> 33);
}

/* Samples [start, start + count) of a global batch of `total` samples that depends only on
 * `seed`, in the C ABI's layout. A learnable problem: the label is 1 when table 0's first id is
 * in the lower half of the table, plus a little signal in dense feature 0; noise in the rest. */
static void make_batch(uint64_t seed, size_t total, size_t start, size_t count, batch *b) {
    static __thread uint32_t len[MAX_SAMPLES][NUM_TABLES];
    static __thread uint64_t id[MAX_SAMPLES][NUM_TABLES][MAX_BAG];
    static __thread float dense[MAX_SAMPLES][NUM_DENSE], y[MAX_SAMPLES];
    uint64_t st = seed * 0x9E3779B97F4A7C15ULL + 12345;
    for (size_t i = 0; i < total; i++) {
        for (size_t t = 0; t < NUM_TABLES; t++) {
            len[i][t] = 1 + next_u32(&st) % MAX_BAG;
            for (size_t k = 0; k < len[i][t]; k++) id[i][t][k] = next_u32(&st) % ROWS;
        }
        y[i] = id[i][0][0] < ROWS / 2 ? 1.0f : 0.0f;
        for (size_t f = 0; f < NUM_DENSE; f++) {
            float noise = (float)(next_u32(&st) % 1000) / 1000.0f - 0.5f;
            dense[i][f] = f == 0 ? y[i] - 0.5f + noise : noise;
        }
    }
    b->n = count;
    b->num_ids = 0;
    for (size_t t = 0; t < NUM_TABLES; t++) {
        for (size_t i = 0; i < count; i++) {
            size_t s = start + i;
            b->lengths[t * count + i] = len[s][t];
            for (size_t k = 0; k < len[s][t]; k++) b->ids[b->num_ids++] = id[s][t][k];
        }
    }
    for (size_t i = 0; i < count; i++) {
        b->labels[i] = y[start + i];
        for (size_t f = 0; f < NUM_DENSE; f++) b->dense[i * NUM_DENSE + f] = dense[start + i][f];
    }
}

static ember_status train(ember_engine *eng, const batch *b, size_t n, double *loss) {
    return ember_train_step(eng, n, b->dense, b->labels, b->lengths, b->ids, b->num_ids, loss);
}

/* Everything one rank does. Collective calls are made in the same order on every rank. */
static void *run_rank(void *arg) {
    rank_ctx *ctx = arg;
    ember_engine *eng = ctx->eng;
    ember_info info;
    expect(ctx, "engine_info", ember_engine_info(eng, &info), EMBER_STATUS_OK);
    ctx->rank = info.rank;
    size_t w = info.rank, nb = info.local_batch_size;
    CHECK(ctx, info.num_dense == NUM_DENSE && info.num_tables == NUM_TABLES, "info: %zu dense, %zu tables", info.num_dense, info.num_tables);
    CHECK(ctx, info.batch_size == BATCH && nb * info.world_size == BATCH, "info: batch %zu, local %zu, %zu ranks", info.batch_size, nb, info.world_size);
    printf("rank %zu of %zu: grid %zux%zu, samples [%zu, %zu) of each global batch of %zu\n", w, info.world_size, info.grid_m,
           info.grid_n, info.sample_start, info.sample_start + nb, info.batch_size);

    /* Train: every rank feeds its slice of the same global batches. */
    static __thread batch b, eval_b;
    double first = 0, last = 0;
    for (int step = 1; step <= ctx->steps; step++) {
        make_batch((uint64_t)step, BATCH, info.sample_start, nb, &b);
        double loss = 0;
        ember_status s = train(eng, &b, nb, &loss);
        expect(ctx, "train_step", s, EMBER_STATUS_OK);
        if (s != EMBER_STATUS_OK) return NULL;
        if (step == 1) first = loss;
        last = loss;
        printf("rank %zu step %d loss %.17g\n", w, step, loss);
    }
    /* Evaluate: each rank passes its share of the eval set; the metrics are global. */
    size_t e0 = EVAL_N * w / info.world_size, e1 = EVAL_N * (w + 1) / info.world_size;
    make_batch(1000, EVAL_N, e0, e1 - e0, &eval_b);
    ember_metrics m;
    static __thread float logits[MAX_SAMPLES], again[MAX_SAMPLES];
    expect(ctx, "eval", ember_eval(eng, eval_b.n, eval_b.dense, eval_b.labels, eval_b.lengths, eval_b.ids, eval_b.num_ids, logits, MAX_SAMPLES, &m), EMBER_STATUS_OK);
    printf("rank %zu eval loss %.17g ne %.17g auc %.17g samples %llu\n", w, m.loss, m.ne, m.auc, (unsigned long long)m.samples);
    CHECK(ctx, m.samples == EVAL_N, "eval samples %llu", (unsigned long long)m.samples);
    if (ctx->steps >= 20) {
        CHECK(ctx, last < first, "training loss did not fall: %f -> %f", first, last);
        CHECK(ctx, m.auc > 0.8, "eval AUC %f too low", m.auc);
    }

    /* Checkpoint: save, train on, reload, and get the same logits back. */
    expect(ctx, "save_checkpoint", ember_save_checkpoint(eng, ctx->ckpt, (uint64_t)ctx->steps), EMBER_STATUS_OK);
    make_batch(9999, BATCH, info.sample_start, nb, &b);
    expect(ctx, "train_step after save", train(eng, &b, nb, NULL), EMBER_STATUS_OK);
    uint64_t loaded = 0;
    expect(ctx, "load_checkpoint", ember_load_checkpoint(eng, ctx->ckpt, &loaded), EMBER_STATUS_OK);
    CHECK(ctx, loaded == (uint64_t)ctx->steps, "loaded step %llu", (unsigned long long)loaded);
    expect(ctx, "eval after load", ember_eval(eng, eval_b.n, eval_b.dense, NULL, eval_b.lengths, eval_b.ids, eval_b.num_ids, again, MAX_SAMPLES, NULL), EMBER_STATUS_OK);
    CHECK(ctx, memcmp(logits, again, eval_b.n * sizeof(float)) == 0, "logits differ after reloading the checkpoint");
    printf("rank %zu checkpoint: saved and reloaded step %llu under %s; logits identical\n", w, (unsigned long long)loaded, ctx->ckpt);

    /* Transport microbenchmark over the engine's job (a one-rank world single-process). */
    ember_bench_row rows[8];
    size_t nrows = 0;
    expect(ctx, "bench all-to-all", ember_bench_collective(eng, EMBER_BENCH_ALL_TO_ALL, 1024, 64 * 1024, 4, 5, 1, rows, 8, &nrows), EMBER_STATUS_OK);
    CHECK(ctx, nrows == 4, "bench rows %zu", nrows);
    for (size_t i = 0; i < nrows; i++) {
        CHECK(ctx, rows[i].wrong == 0, "bench: %llu wrong values at size %zu", (unsigned long long)rows[i].wrong, rows[i].size);
        if (w == 0) printf("bench a2a %zu ranks: size %8zu  count %6zu  time %9.1f us  algbw %7.3f GB/s  busbw %7.3f GB/s  wrong %llu\n",
                           info.world_size, rows[i].size, rows[i].count, rows[i].time_us, rows[i].algbw, rows[i].busbw,
                           (unsigned long long)rows[i].wrong);
    }

    /* Error paths: every one must return its code and a message, and leave the engine usable.
     * Every rank makes the same calls (a rejected collective call fails on every rank). */
    if (w == 0) printf("error paths:\n");
    make_batch(1, BATCH, info.sample_start, nb, &b);
    expect(ctx, "train: NULL engine", ember_train_step(NULL, nb, b.dense, b.labels, b.lengths, b.ids, b.num_ids, NULL), EMBER_STATUS_ERR_NULL_POINTER);
    expect(ctx, "train: NULL dense", ember_train_step(eng, nb, NULL, b.labels, b.lengths, b.ids, b.num_ids, NULL), EMBER_STATUS_ERR_NULL_POINTER);
    expect(ctx, "train: batch_size 0", ember_train_step(eng, 0, b.dense, b.labels, b.lengths, b.ids, b.num_ids, NULL), EMBER_STATUS_ERR_INVALID_ARGUMENT);
    expect(ctx, "train: num_ids mismatch", ember_train_step(eng, nb, b.dense, b.labels, b.lengths, b.ids, b.num_ids - 1, NULL), EMBER_STATUS_ERR_INVALID_ARGUMENT);
    if (info.world_size > 1) {
        /* A rank must feed exactly its slice. */
        expect(ctx, "train: not the local batch size", ember_train_step(eng, nb / 2, b.dense, b.labels, b.lengths, b.ids, b.num_ids, NULL),
               EMBER_STATUS_ERR_INVALID_ARGUMENT);
        /* Only rank 0's batch is bad: it gets the reason, the others ERR_PEER; nobody trains. */
        if (w == 0) b.ids[0] = ROWS;
        ember_status s = train(eng, &b, nb, NULL);
        expect(ctx, "train: one rank's id out of range", s, w == 0 ? EMBER_STATUS_ERR_INPUT : EMBER_STATUS_ERR_PEER);
        b.ids[0] = 0;
        expect(ctx, "save: not the current step", ember_save_checkpoint(eng, ctx->ckpt, 12345), EMBER_STATUS_ERR_INVALID_ARGUMENT);
    }
    b.ids[0] = ROWS; /* out of range */
    expect(ctx, "train: id out of range", train(eng, &b, nb, NULL), EMBER_STATUS_ERR_INPUT);
    b.ids[0] = 0;
    b.labels[3] = 0.5f;
    expect(ctx, "train: label not 0/1", train(eng, &b, nb, NULL), EMBER_STATUS_ERR_INPUT);
    b.labels[3] = 1.0f;
    expect(ctx, "eval: logits buffer too small", ember_eval(eng, nb, b.dense, b.labels, b.lengths, b.ids, b.num_ids, logits, nb - 1, NULL), EMBER_STATUS_ERR_INVALID_ARGUMENT);
    expect(ctx, "eval: metrics without labels", ember_eval(eng, nb, b.dense, NULL, b.lengths, b.ids, b.num_ids, NULL, 0, &m), EMBER_STATUS_ERR_NULL_POINTER);
    expect(ctx, "load: no checkpoint", ember_load_checkpoint(eng, "/nonexistent/ckpt", NULL), EMBER_STATUS_ERR_INPUT);
    expect(ctx, "bench: factor 1", ember_bench_collective(eng, EMBER_BENCH_ALL_REDUCE, 1024, 4096, 1, 5, 1, rows, 8, &nrows), EMBER_STATUS_ERR_INVALID_ARGUMENT);
    expect(ctx, "bench: rows_cap too small", ember_bench_collective(eng, EMBER_BENCH_ALL_REDUCE, 1024, 4096, 2, 5, 1, rows, 2, &nrows), EMBER_STATUS_ERR_INVALID_ARGUMENT);
    CHECK(ctx, nrows == 3, "bench: %zu rows needed, want 3", nrows);
    expect(ctx, "info: NULL out", ember_engine_info(eng, NULL), EMBER_STATUS_ERR_NULL_POINTER);
    expect(ctx, "test_panic (caught)", ember_test_panic(), EMBER_STATUS_ERR_PANIC);
    expect(ctx, "train: still usable", train(eng, &b, nb, NULL), EMBER_STATUS_OK);
    expect(ctx, "info after the errors", ember_engine_info(eng, &info), EMBER_STATUS_OK);
    CHECK(ctx, info.steps_done == (uint64_t)ctx->steps + 1, "steps_done %llu: a rejected call trained", (unsigned long long)info.steps_done);

    expect(ctx, "destroy", ember_engine_destroy(eng), EMBER_STATUS_OK);
    expect(ctx, "use after destroy", ember_engine_info(eng, &info), EMBER_STATUS_ERR_INVALID_HANDLE);
    expect(ctx, "train after destroy", train(eng, &b, nb, NULL), EMBER_STATUS_ERR_INVALID_HANDLE);
    expect(ctx, "destroy twice", ember_engine_destroy(eng), EMBER_STATUS_ERR_INVALID_HANDLE);
    return NULL;
}

/* nftw callback: remove one entry of the temporary checkpoint folder (children first). */
static int remove_entry(const char *path, const struct stat *st, int type, struct FTW *ftw) {
    (void)st;
    (void)type;
    (void)ftw;
    return remove(path);
}

/* Remove the temporary checkpoint folder (if this run made one) and return `status`. */
static int finish(const char *tmp, int status) {
    if (tmp != NULL && nftw(tmp, remove_entry, 16, FTW_DEPTH | FTW_PHYS) != 0) {
        fprintf(stderr, "could not remove the temporary checkpoint folder %s\n", tmp);
        return 1;
    }
    return status;
}

int main(int argc, char **argv) {
    const char *ckpt = NULL; /* NULL: a temporary folder, made below and removed at the end */
    int steps = 30;
    long ranks = 0; /* 0: one engine for this process (the whole model, or its launcher rank) */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--ranks") == 0 && i + 1 < argc) {
            ranks = strtol(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
            steps = (int)strtol(argv[++i], NULL, 10);
        } else {
            ckpt = argv[i];
        }
    }
    if (ranks < 0 || ranks > MAX_RANKS || steps < 1) {
        fprintf(stderr, "usage: %s [--ranks N (1..%d)] [--steps S] [checkpoint-dir]\n", argv[0], MAX_RANKS);
        return 2;
    }
    printf("ember %s (ABI %u, header ABI %d)\n", ember_version(), ember_abi_version(), EMBER_ABI_VERSION);
    char tmp_ckpt[4096];
    const char *tmp = NULL; /* the temporary folder, when this run made one */
    if (ckpt == NULL) {
        const char *tmpdir = getenv("TMPDIR");
        if (tmpdir == NULL || tmpdir[0] == '\0') tmpdir = "/tmp";
        int len = snprintf(tmp_ckpt, sizeof tmp_ckpt, "%s/ember-example-XXXXXX", tmpdir);
        if (len < 0 || (size_t)len >= sizeof tmp_ckpt || mkdtemp(tmp_ckpt) == NULL) {
            fprintf(stderr, "cannot create a temporary folder under %s; pass a checkpoint-dir\n", tmpdir);
            return 2;
        }
        ckpt = tmp = tmp_ckpt;
    }
    rank_ctx main_ctx = {NULL, ckpt, steps, 0, 0};
    CHECK(&main_ctx, ember_abi_version() == EMBER_ABI_VERSION, "ABI mismatch");

    /* Errors of engine creation (before any job is joined). */
    ember_engine *bad = NULL;
    expect(&main_ctx, "create: NULL toml", ember_engine_create_from_toml(NULL, &bad), EMBER_STATUS_ERR_NULL_POINTER);
    expect(&main_ctx, "create: NULL out", ember_engine_create_from_toml(CONFIG, NULL), EMBER_STATUS_ERR_NULL_POINTER);
    expect(&main_ctx, "create: bad TOML", ember_engine_create_from_toml("this is = = not toml", &bad), EMBER_STATUS_ERR_CONFIG);
    expect(&main_ctx, "create: invalid model", ember_engine_create_from_toml("batch_size = 0\nseed = 1\n", &bad), EMBER_STATUS_ERR_CONFIG);
    expect(&main_ctx, "create: unknown preset", ember_engine_create_from_preset("nope", 0, &bad), EMBER_STATUS_ERR_CONFIG);
    expect(&main_ctx, "create: missing file", ember_engine_create_from_file("/nonexistent/ember.toml", &bad), EMBER_STATUS_ERR_IO);
    ember_engine *hs[MAX_RANKS] = {NULL};
    expect(&main_ctx, "create ranks: n = 0", ember_engine_create_local_ranks(CONFIG, 0, hs), EMBER_STATUS_ERR_INVALID_ARGUMENT);
    expect(&main_ctx, "create ranks: NULL handles", ember_engine_create_local_ranks(CONFIG, 4, NULL), EMBER_STATUS_ERR_NULL_POINTER);
    expect(&main_ctx, "create ranks: batch not divisible", ember_engine_create_local_ranks(CONFIG, 3, hs), EMBER_STATUS_ERR_CONFIG);
    CHECK(&main_ctx, bad == NULL && hs[0] == NULL, "a failed create wrote a handle");

    int failures = 0;
    if (ranks == 0) {
        /* One engine: the whole model, or under a launcher this process's rank (collective). */
        ember_engine *eng = NULL;
        ember_status s = ember_engine_create_from_toml(CONFIG, &eng);
        expect(&main_ctx, "create_from_toml", s, EMBER_STATUS_OK);
        if (s != EMBER_STATUS_OK) return finish(tmp, 1);
        ember_info info;
        if (tmp != NULL && ember_engine_info(eng, &info) == EMBER_STATUS_OK && info.world_size > 1) {
            /* Every rank gets here (same arguments): each leaves without a collective call. */
            fprintf(stderr, "rank %zu: the %zu processes of a job save one checkpoint into one folder: pass a "
                            "checkpoint-dir they all reach (ember launch -n %zu -- %s DIR)\n",
                    info.rank, info.world_size, info.world_size, argv[0]);
            ember_engine_destroy(eng);
            return finish(tmp, 2);
        }
        rank_ctx ctx = {eng, ckpt, steps, 0, 0};
        run_rank(&ctx);
        failures += ctx.failures;
    } else {
        /* In-process ranks: one handle per rank, each driven by its own thread. */
        ember_status s = ember_engine_create_local_ranks(CONFIG, (size_t)ranks, hs);
        expect(&main_ctx, "create_local_ranks", s, EMBER_STATUS_OK);
        if (s != EMBER_STATUS_OK) return finish(tmp, 1);
        rank_ctx ctxs[MAX_RANKS];
        pthread_t th[MAX_RANKS];
        for (long r = 0; r < ranks; r++) {
            ctxs[r] = (rank_ctx){hs[r], ckpt, steps, 0, (size_t)r};
            if (pthread_create(&th[r], NULL, run_rank, &ctxs[r]) != 0) {
                fprintf(stderr, "pthread_create failed\n");
                return finish(tmp, 1);
            }
        }
        for (long r = 0; r < ranks; r++) {
            pthread_join(th[r], NULL);
            failures += ctxs[r].failures;
        }
    }
    expect(&main_ctx, "destroy NULL", ember_engine_destroy(NULL), EMBER_STATUS_OK);
    failures += main_ctx.failures;
    if (finish(tmp, 0) != 0) failures++;
    if (failures) {
        printf("FAILED: %d check(s)\n", failures);
        return 1;
    }
    printf("all checks passed\n");
    return 0;
}
