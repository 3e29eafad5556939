/*
 * outage.c: a trainer whose server goes away under it (tests/tests/capi.rs runs it). It keeps
 * the default SIGPIPE action, as any C program does, so a write to a dead connection that
 * raised the signal would end it with status 141.
 *
 *   outage ADDR dies      push until the server has been gone for 5 calls in a row, then exit 0
 *   outage ADDR restart N push until N pushes were answered, through the server's restarts,
 *                         with the one client; then print how every push ended and the sums
 *
 * Each push adds 1 to the 4 keys of the dense table "outage" (updater "sum"), one at a time, and
 * "pushed N" is printed after the Nth success, for the test to time its kill.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <tessera.h>

#define KEYS 4
#define FAILURES_IN_A_ROW_MAX 5

static void die(const char *what, int rc) {
    fprintf(stderr, "outage: %s: %s: %s\n", what, tessera_status_name(rc), tessera_last_error());
    exit(1);
}

static int dies(TesseraClient client, TesseraTable table) {
    const float ones[KEYS] = {1, 1, 1, 1};
    int pushed = 0, failed = 0;
    while (failed < FAILURES_IN_A_ROW_MAX) {
        int rc = tessera_push_range(client, table, 0, ones, KEYS, NULL);
        if (rc == TESSERA_OK) {
            failed = 0;
            printf("pushed %d\n", ++pushed);
        } else {
            failed++;
            printf("push failed: %s: %s\n", tessera_status_name(rc), tessera_last_error());
            usleep(20 * 1000);
        }
        fflush(stdout);
    }
    printf("outage: the server is gone after %d pushes; exiting cleanly\n", pushed);
    return 0;
}

/* Pushes until `want` pushes were answered. A push that fails with TESSERA_ERR_UNKNOWN_OUTCOME
 * may have been applied; any other failure (the server still down) was not. */
static int restart(TesseraClient client, TesseraTable table, int want) {
    const float ones[KEYS] = {1, 1, 1, 1};
    int answered = 0, unknown = 0, refused = 0;
    while (answered < want) {
        int rc = tessera_push_range(client, table, 0, ones, KEYS, NULL);
        if (rc == TESSERA_OK) {
            printf("pushed %d\n", ++answered);
            continue;
        }
        printf("push failed: %s: %s\n", tessera_status_name(rc), tessera_last_error());
        if (rc == TESSERA_ERR_UNKNOWN_OUTCOME) {
            unknown++;
        } else if (rc == TESSERA_ERR_CONNECT || rc == TESSERA_ERR_TRANSPORT) {
            refused++;
        } else {
            die("push", rc);
        }
        if (unknown + refused > 100) die("push: the server did not come back", rc);
        usleep(20 * 1000);
    }
    float values[KEYS];
    int rc = tessera_pull_range(client, table, 0, values, KEYS, NULL);
    if (rc != TESSERA_OK) die("pull", rc);
    printf("answered %d unknown %d refused %d values", answered, unknown, refused);
    for (int k = 0; k < KEYS; k++) printf(" %.0f", values[k]);
    printf("\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s ADDR dies | %s ADDR restart N\n", argv[0], argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    TesseraClient client;
    TesseraTable table;
    /* A trainer that expects its server gone for good gives up reconnecting after one try. */
    TesseraOptions options;
    tessera_options_init(&options);
    options.transport = "tcp";
    if (strcmp(argv[2], "dies") == 0) options.reconnect_attempts = 1;
    int rc = tessera_connect_with(argv[1], &options, &client);
    if (rc != TESSERA_OK) die("connect", rc);
    rc = tessera_create_table(client, "outage", TESSERA_DENSE, 0, KEYS, 1, "sum", &table);
    if (rc != TESSERA_OK) die("create table", rc);
    int status = 2;
    if (strcmp(argv[2], "dies") == 0) status = dies(client, table);
    if (strcmp(argv[2], "restart") == 0 && argc == 4) status = restart(client, table, atoi(argv[3]));
    tessera_close(client);
    return status;
}
