/*
 * trainer.c: a native trainer linked against libtessera (the test suite builds and runs it
 * against a live server). It
 *   1. trains a linear regression by SGD on a dense table, from two threads, each with its own
 *      client (connected with options), and checks that the learned weights are the true ones;
 *   2. pushes and pulls keys of a sparse table defined with table options, polling a ticket;
 *   3. has four threads push through one shared client at once, and checks the exact sum;
 *   4. passes bad input on purpose (NULL pointers, wrong lengths, unknown tables and handles,
 *      use after close) and checks that each call is refused with the right status.
 *
 *   cc trainer.c $(pkg-config --cflags --libs tessera) -lpthread -o trainer
 *   ./trainer 127.0.0.1:7070
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tessera.h>

#define FEATURES 64
#define BATCH 32
#define ITERS 300
#define SHARED_THREADS 4
#define SHARED_PUSHES 100

static const char *servers;

#define CHECK(call)                                                                              \
    do {                                                                                         \
        int rc_ = (call);                                                                        \
        if (rc_ != TESSERA_OK) {                                                                 \
            fprintf(stderr, "%s:%d: %s: %s: %s\n", __FILE__, __LINE__, #call,                    \
                    tessera_status_name(rc_), tessera_last_error());                            \
            exit(1);                                                                             \
        }                                                                                        \
    } while (0)

static void expect(int rc, int want, const char *what) {
    if (rc != want) {
        fprintf(stderr, "%s: got %s, want %s (%s)\n", what, tessera_status_name(rc), tessera_status_name(want),
                tessera_last_error());
        exit(1);
    }
    if (strlen(tessera_last_error()) == 0) {
        fprintf(stderr, "%s: refused with no message\n", what);
        exit(1);
    }
    printf("refused as expected: %s: %s: %s\n", what, tessera_status_name(rc), tessera_last_error());
}

static float true_weight(int k) { return (float)(k % 8) / 8.0f - 0.5f; }

static float uniform(unsigned *state) {
    *state = *state * 1103515245u + 12345u;
    return (float)((*state >> 8) & 0xffff) / 32768.0f - 1.0f;
}

struct trainer {
    uint32_t worker;
    double loss;
};

/* One SGD worker: pull the weights, compute a minibatch gradient, push it, BATCH x ITERS. */
static void *train(void *arg) {
    struct trainer *me = arg;
    TesseraClient client;
    TesseraTable table;
    uint32_t dim;
    /* Every setting starts at its default; the cluster secret, if any, comes from the environment. */
    TesseraOptions options;
    CHECK(tessera_options_init(&options));
    options.worker = me->worker;
    options.transport = "tcp";
    options.io_timeout_ms = 10000;
    CHECK(tessera_connect_with(servers, &options, &client));
    CHECK(tessera_table(client, "c.linreg", &table, &dim));
    if (dim != 1) {
        fprintf(stderr, "c.linreg has dim %u\n", dim);
        exit(1);
    }
    float weights[FEATURES], x[FEATURES];
    /* Gradients are computed straight into a push buffer: over RDMA it is sent without a copy. */
    float *grad;
    TesseraBuffer grad_buffer;
    CHECK(tessera_push_buffer(client, FEATURES, &grad_buffer, &grad));
    unsigned seed = 1234 + me->worker;
    for (int it = 1; it <= ITERS; it++) {
        TesseraTicket pulled, pushed;
        CHECK(tessera_pull_range(client, table, 0, weights, FEATURES, &pulled));
        CHECK(tessera_wait(client, pulled));
        memset(grad, 0, FEATURES * sizeof *grad);
        double loss = 0;
        for (int b = 0; b < BATCH; b++) {
            float y = 0, p = 0;
            for (int k = 0; k < FEATURES; k++) {
                x[k] = uniform(&seed);
                y += true_weight(k) * x[k];
                p += weights[k] * x[k];
            }
            float e = p - y;
            loss += e * e;
            for (int k = 0; k < FEATURES; k++) grad[k] += e * x[k] / BATCH;
        }
        me->loss = loss / BATCH;
        CHECK(tessera_set_clock(client, (uint64_t)it));
        CHECK(tessera_push_range_from(client, table, 0, grad_buffer, &pushed));
        CHECK(tessera_wait(client, pushed));
    }
    CHECK(tessera_push_buffer_free(client, grad_buffer));
    CHECK(tessera_close(client));
    return NULL;
}

struct shared {
    TesseraClient client;
    TesseraTable table;
};

/* Pushes 1.0 to key 3 of a sum table SHARED_PUSHES times, half waited at once, half by ticket. */
static void *push_ones(void *arg) {
    struct shared *s = arg;
    uint64_t key = 3;
    float one = 1.0f;
    for (int i = 0; i < SHARED_PUSHES; i++) {
        if (i % 2 == 0) {
            CHECK(tessera_push(s->client, s->table, &key, 1, &one, 1, NULL));
        } else {
            TesseraTicket t;
            CHECK(tessera_push(s->client, s->table, &key, 1, &one, 1, &t));
            CHECK(tessera_wait(s->client, t));
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SERVER[,SERVER...]\n", argv[0]);
        return 2;
    }
    servers = argv[1];
    printf("libtessera %s (header %d.%d.%d)\n", tessera_version(), TESSERA_VERSION_MAJOR, TESSERA_VERSION_MINOR,
           TESSERA_VERSION_PATCH);
    TesseraClient client;
    TesseraTable linreg, sparse, counts, other;
    CHECK(tessera_connect(servers, 9, NULL, &client));
    CHECK(tessera_create_table(client, "c.linreg", TESSERA_DENSE, 0, FEATURES, 1, "sgd{lr=0.05}", &linreg));

    /* 1. Two trainer threads, each with its own client. */
    pthread_t threads[SHARED_THREADS];
    struct trainer trainers[2] = {{0, 0}, {1, 0}};
    for (int i = 0; i < 2; i++) pthread_create(&threads[i], NULL, train, &trainers[i]);
    for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
    float weights[FEATURES];
    CHECK(tessera_pull_range(client, linreg, 0, weights, FEATURES, NULL));
    float worst = 0;
    for (int k = 0; k < FEATURES; k++) worst = fmaxf(worst, fabsf(weights[k] - true_weight(k)));
    printf("linear regression: last minibatch loss %.5f and %.5f, largest weight error %.4f\n", trainers[0].loss,
           trainers[1].loss, worst);
    if (worst > 0.05f) {
        fprintf(stderr, "the trainers did not learn the weights (error %.4f)\n", worst);
        return 1;
    }

    /* 2. A sparse table: a push, then a pull whose ticket is polled, then waited on. */
    TesseraTableOptions definition;
    CHECK(tessera_table_options_init(&definition));
    definition.kind = TESSERA_SPARSE;
    definition.end = UINT64_MAX;
    definition.dim = 2;
    definition.non_finite = TESSERA_NON_FINITE_SKIP;
    CHECK(tessera_create_table_with(client, "c.sparse", &definition, &sparse));
    uint64_t keys[3] = {5, 1ull << 40, 77};
    float grads[6] = {1, 2, 3, 4, 5, 6}, values[6] = {0};
    TesseraTicket pulled;
    CHECK(tessera_push(client, sparse, keys, 3, grads, 6, NULL));
    CHECK(tessera_pull(client, sparse, keys, 3, values, 6, &pulled));
    int ready = 0;
    CHECK(tessera_poll(client, pulled, &ready));
    CHECK(tessera_wait_timeout(client, pulled, 10000));
    if (memcmp(values, grads, sizeof values) != 0) {
        fprintf(stderr, "the sparse pull did not return what was pushed\n");
        return 1;
    }

    /* 3. Several threads through one client at once. */
    CHECK(tessera_create_table(client, "c.counts", TESSERA_DENSE, 0, 8, 1, "sum", &counts));
    struct shared shared = {client, counts};
    for (int i = 0; i < SHARED_THREADS; i++) pthread_create(&threads[i], NULL, push_ones, &shared);
    for (int i = 0; i < SHARED_THREADS; i++) pthread_join(threads[i], NULL);
    float count[8];
    CHECK(tessera_pull_range(client, counts, 0, count, 8, NULL));
    if (count[3] != SHARED_THREADS * SHARED_PUSHES) {
        fprintf(stderr, "threads sharing a client pushed %f, want %d\n", count[3], SHARED_THREADS * SHARED_PUSHES);
        return 1;
    }
    printf("%d threads on one client: key 3 holds %.0f\n", SHARED_THREADS, count[3]);

    /* 4. Bad input: each call is refused, and nothing crashes. */
    TesseraClient spare;
    expect(tessera_push(client, sparse, NULL, 3, grads, 6, NULL), TESSERA_ERR_NULL, "NULL keys");
    expect(tessera_pull(client, sparse, keys, 3, NULL, 6, NULL), TESSERA_ERR_NULL, "NULL output");
    expect(tessera_push(client, sparse, keys, 3, grads, 5, NULL), TESSERA_ERR_ARGUMENT, "5 values for 3 keys of dim 2");
    expect(tessera_pull_range(client, linreg, 60, weights, 8, NULL), TESSERA_ERR_ARGUMENT, "a range past the table");
    expect(tessera_table(client, "no.such.table", &other, NULL), TESSERA_ERR_UNKNOWN_TABLE, "an unknown table");
    expect(tessera_table(client, "c.linreg", NULL, NULL), TESSERA_ERR_NULL, "NULL table out-pointer");
    expect(tessera_push(client, 99, keys, 3, grads, 6, NULL), TESSERA_ERR_CLOSED, "a table handle never opened");
    expect(tessera_create_table(client, "c.bad", 7, 0, 10, 1, NULL, &other), TESSERA_ERR_ARGUMENT, "an unknown kind");
    expect(tessera_create_table(client, "c.linreg", TESSERA_DENSE, 0, FEATURES, 2, NULL, &other), TESSERA_ERR_SERVER,
           "a table redefined");
    expect(tessera_connect(NULL, 0, NULL, &spare), TESSERA_ERR_NULL, "NULL servers");
    expect(tessera_connect(servers, 0, "carrier-pigeon", &spare), TESSERA_ERR_ARGUMENT, "an unknown transport");
    expect(tessera_connect("127.0.0.1:1", 0, "tcp", &spare), TESSERA_ERR_CONNECT, "no server there");
    expect(tessera_wait(client, pulled), TESSERA_ERR_CLOSED, "a ticket waited on twice");
    expect(tessera_wait(client, 12345), TESSERA_ERR_CLOSED, "a ticket never issued");
    expect(tessera_wait_timeout(client, 12345, 10), TESSERA_ERR_CLOSED, "a ticket never issued, with a timeout");
    TesseraOptions newer;
    CHECK(tessera_options_init(&newer));
    newer.size += 8;
    expect(tessera_connect_with(servers, &newer, &spare), TESSERA_ERR_ARGUMENT, "options from a newer header");
    CHECK(tessera_close(client));
    expect(tessera_push(client, sparse, keys, 3, grads, 6, NULL), TESSERA_ERR_CLOSED, "a push after close");
    expect(tessera_close(client), TESSERA_ERR_CLOSED, "a client closed twice");
    expect(tessera_set_clock(0, 1), TESSERA_ERR_CLOSED, "client handle 0");
    printf("trainer: ok\n");
    return 0;
}
