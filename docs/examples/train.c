/* Ember C ABI example: train a small DLRM for a few steps on synthetic data made here, print
 * the metrics, save and reload a checkpoint, and check the error paths.
 *
 * Build (after `cargo build -p ember-ffi`; TARGET is the cargo target dir, e.g. target/debug):
 *   gcc -std=c99 -Wall -Wextra -Iengine/include docs/examples/train.c \
 *       -L$TARGET -Wl,-rpath,$TARGET -lember -o train
 *   ./train [checkpoint-dir]
 * Exit status 0 when every check passed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ember.h"

#define NUM_DENSE 4
#define NUM_TABLES 3
#define ROWS 100
#define BATCH 64
#define STEPS 30
#define BAG 2 /* ids per bag */

static const char *CONFIG =
    "batch_size = 64\n"
    "steps = 30\n"
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

static int failures = 0;

#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) {                                     \
            fprintf(stderr, "CHECK FAILED (line %d): ", __LINE__); \
            fprintf(stderr, __VA_ARGS__);                  \
            fprintf(stderr, "\n");                         \
            failures++;                                    \
        }                                                  \
    } while (0)

/* Expect status `want` from `got`, with a non-empty message for errors. */
static void expect(const char *what, ember_status got, ember_status want) {
    const char *msg = ember_last_error();
    CHECK(got == want, "%s: got %s, want %s (%s)", what, ember_status_name(got), ember_status_name(want), msg);
    if (want != EMBER_STATUS_OK) {
        CHECK(msg != NULL && msg[0] != '\0', "%s: empty error message", what);
        printf("  ok  %-34s -> %s: %s\n", what, ember_status_name(got), msg);
    }
}

/* A deterministic generator (64-bit LCG). */
static uint64_t state = 12345;
static uint32_t next_u32(void) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(state >> 33);
}

typedef struct {
    float dense[BATCH * NUM_DENSE];
    float labels[BATCH];
    uint32_t lengths[NUM_TABLES * BATCH];
    uint64_t ids[NUM_TABLES * BATCH * BAG];
    size_t num_ids;
} batch;

/* A learnable problem: the label is 1 when table 0's first id is in the lower half of the
 * table, plus a little signal in dense feature 0; some noise in the rest. */
static void make_batch(batch *b) {
    b->num_ids = 0;
    for (size_t t = 0; t < NUM_TABLES; t++) {
        for (size_t i = 0; i < BATCH; i++) {
            b->lengths[t * BATCH + i] = BAG;
            for (size_t k = 0; k < BAG; k++) b->ids[b->num_ids++] = next_u32() % ROWS;
        }
    }
    for (size_t i = 0; i < BATCH; i++) {
        uint64_t id0 = b->ids[i * BAG]; /* table 0, sample i, first id */
        float y = id0 < ROWS / 2 ? 1.0f : 0.0f;
        b->labels[i] = y;
        for (size_t f = 0; f < NUM_DENSE; f++) {
            float noise = (float)(next_u32() % 1000) / 1000.0f - 0.5f;
            b->dense[i * NUM_DENSE + f] = f == 0 ? y - 0.5f + noise : noise;
        }
    }
}

int main(int argc, char **argv) {
    const char *ckpt = argc > 1 ? argv[1] : "ember-example-ckpt";
    printf("ember %s (ABI %u, header ABI %d)\n", ember_version(), ember_abi_version(), EMBER_ABI_VERSION);
    CHECK(ember_abi_version() == EMBER_ABI_VERSION, "ABI mismatch");

    ember_engine *eng = NULL;
    ember_status s = ember_engine_create_from_toml(CONFIG, &eng);
    expect("create_from_toml", s, EMBER_STATUS_OK);
    if (s != EMBER_STATUS_OK) return 1;
    ember_info info;
    expect("engine_info", ember_engine_info(eng, &info), EMBER_STATUS_OK);
    CHECK(info.num_dense == NUM_DENSE && info.num_tables == NUM_TABLES, "info: %zu dense, %zu tables", info.num_dense, info.num_tables);

    /* Train. */
    static batch b, eval_b;
    make_batch(&eval_b);
    double first = 0, last = 0;
    for (int step = 1; step <= STEPS; step++) {
        make_batch(&b);
        double loss = 0;
        s = ember_train_step(eng, BATCH, b.dense, b.labels, b.lengths, b.ids, b.num_ids, &loss);
        expect("train_step", s, EMBER_STATUS_OK);
        if (s != EMBER_STATUS_OK) break;
        if (step == 1) first = loss;
        last = loss;
        if (step % 10 == 0 || step == 1) printf("step %3d  loss %.4f\n", step, loss);
    }
    ember_metrics m;
    float logits[BATCH];
    expect("eval", ember_eval(eng, BATCH, eval_b.dense, eval_b.labels, eval_b.lengths, eval_b.ids, eval_b.num_ids, logits, BATCH, &m), EMBER_STATUS_OK);
    printf("eval: loss %.4f  ne %.4f  auc %.4f  (%llu samples; train loss %.4f -> %.4f)\n", m.loss, m.ne, m.auc,
           (unsigned long long)m.samples, first, last);
    CHECK(m.samples == BATCH, "eval samples %llu", (unsigned long long)m.samples);
    CHECK(last < first, "training loss did not fall: %f -> %f", first, last);
    CHECK(m.auc > 0.8, "eval AUC %f too low", m.auc);

    /* Checkpoint: save, train on, reload, and get the same logits back. */
    expect("save_checkpoint", ember_save_checkpoint(eng, ckpt, STEPS), EMBER_STATUS_OK);
    make_batch(&b);
    expect("train_step after save", ember_train_step(eng, BATCH, b.dense, b.labels, b.lengths, b.ids, b.num_ids, NULL), EMBER_STATUS_OK);
    uint64_t loaded = 0;
    expect("load_checkpoint", ember_load_checkpoint(eng, ckpt, &loaded), EMBER_STATUS_OK);
    CHECK(loaded == STEPS, "loaded step %llu", (unsigned long long)loaded);
    float again[BATCH];
    expect("eval after load", ember_eval(eng, BATCH, eval_b.dense, NULL, eval_b.lengths, eval_b.ids, eval_b.num_ids, again, BATCH, NULL), EMBER_STATUS_OK);
    CHECK(memcmp(logits, again, sizeof logits) == 0, "logits differ after reloading the checkpoint");
    printf("checkpoint: saved and reloaded step %llu under %s; logits identical\n", (unsigned long long)loaded, ckpt);

    /* Error paths: every one must return its code and a message, and leave the engine usable. */
    printf("error paths:\n");
    ember_engine *bad = NULL;
    expect("create: NULL toml", ember_engine_create_from_toml(NULL, &bad), EMBER_STATUS_ERR_NULL_POINTER);
    expect("create: NULL out", ember_engine_create_from_toml(CONFIG, NULL), EMBER_STATUS_ERR_NULL_POINTER);
    expect("create: bad TOML", ember_engine_create_from_toml("this is = = not toml", &bad), EMBER_STATUS_ERR_CONFIG);
    expect("create: invalid model", ember_engine_create_from_toml("batch_size = 0\nseed = 1\n", &bad), EMBER_STATUS_ERR_CONFIG);
    expect("create: unknown preset", ember_engine_create_from_preset("nope", 0, &bad), EMBER_STATUS_ERR_CONFIG);
    expect("create: missing file", ember_engine_create_from_file("/nonexistent/ember.toml", &bad), EMBER_STATUS_ERR_IO);
    CHECK(bad == NULL, "a failed create wrote a handle");
    expect("train: NULL engine", ember_train_step(NULL, BATCH, b.dense, b.labels, b.lengths, b.ids, b.num_ids, NULL), EMBER_STATUS_ERR_NULL_POINTER);
    expect("train: NULL dense", ember_train_step(eng, BATCH, NULL, b.labels, b.lengths, b.ids, b.num_ids, NULL), EMBER_STATUS_ERR_NULL_POINTER);
    expect("train: batch_size 0", ember_train_step(eng, 0, b.dense, b.labels, b.lengths, b.ids, b.num_ids, NULL), EMBER_STATUS_ERR_INVALID_ARGUMENT);
    expect("train: num_ids mismatch", ember_train_step(eng, BATCH, b.dense, b.labels, b.lengths, b.ids, b.num_ids - 1, NULL), EMBER_STATUS_ERR_INVALID_ARGUMENT);
    b.ids[0] = ROWS; /* out of range */
    expect("train: id out of range", ember_train_step(eng, BATCH, b.dense, b.labels, b.lengths, b.ids, b.num_ids, NULL), EMBER_STATUS_ERR_INPUT);
    b.ids[0] = 0;
    b.labels[3] = 0.5f;
    expect("train: label not 0/1", ember_train_step(eng, BATCH, b.dense, b.labels, b.lengths, b.ids, b.num_ids, NULL), EMBER_STATUS_ERR_INPUT);
    b.labels[3] = 1.0f;
    expect("eval: logits buffer too small", ember_eval(eng, BATCH, b.dense, b.labels, b.lengths, b.ids, b.num_ids, logits, BATCH - 1, NULL), EMBER_STATUS_ERR_INVALID_ARGUMENT);
    expect("load: no checkpoint", ember_load_checkpoint(eng, "/nonexistent/ckpt", NULL), EMBER_STATUS_ERR_INPUT);
    expect("test_panic (caught)", ember_test_panic(), EMBER_STATUS_ERR_PANIC);
    expect("train: still usable", ember_train_step(eng, BATCH, b.dense, b.labels, b.lengths, b.ids, b.num_ids, NULL), EMBER_STATUS_OK);

    expect("destroy", ember_engine_destroy(eng), EMBER_STATUS_OK);
    expect("use after destroy", ember_engine_info(eng, &info), EMBER_STATUS_ERR_INVALID_HANDLE);
    expect("destroy twice", ember_engine_destroy(eng), EMBER_STATUS_ERR_INVALID_HANDLE);
    expect("destroy NULL", ember_engine_destroy(NULL), EMBER_STATUS_OK);

    if (failures) {
        printf("FAILED: %d check(s)\n", failures);
        return 1;
    }
    printf("all checks passed\n");
    return 0;
}
