/*
 * edgeadapt_head_cli.c - a small host CLI over the edgeadapt head library, for tests,
 * benchmarks and fuzzing. (The CLI uses malloc and stdio; the library does not.)
 *
 *   ea_head_cli info HEAD.eah
 *   ea_head_cli logits HEAD.eah EMB.f32 OUT.f32          N x D float32 in, N x C float32 out
 *   ea_head_cli classify HEAD.eah EMB.f32 [K]            top-K names and probabilities per row
 *   ea_head_cli column HEAD.eah SHOTS.f32 OUT.f32 [BACKGROUND.f32 Q]   new column + bias (D+1 floats)
 *   ea_head_cli add HEAD.eah SHOTS.f32 NAME OUT.eah [BACKGROUND.f32 Q]
 *   ea_head_cli serialize HEAD.eah OUT.eah
 *   ea_head_cli sha256 FILE
 *   ea_head_cli bench HEAD.eah EMB.f32 REPEATS SHOTS BACKGROUND   seconds per open / classification /
 *                                                        column / added class (first SHOTS rows are the
 *                                                        shots, the next BACKGROUND rows the background)
 *   ea_head_cli check FILE...                            run the fuzz target on each file (regressions),
 *                                                        once from a heap copy, once from read-only pages
 *   ea_head_cli fuzz SECONDS MAX_EXECUTIONS SEED CRASH_DIR SEED_FILE...   mutation fuzzing
 *
 * Embedding files are raw little-endian float32, row after row. Exit status (the edgeadapt CLI
 * convention): 0 ok, 1 library or I/O error (the ea_strerror text on stderr), 2 usage error,
 * 77 fuzz target crash.
 */
#define _GNU_SOURCE
#include "edgeadapt_head.h"

#include <fcntl.h>
#include <fenv.h>
#include <math.h>
#include <signal.h>
#include <sys/mman.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ files */
static uint8_t *read_file(const char *path, size_t *size) {
    FILE *file = fopen(path, "rb");
    uint8_t *data;
    long length;
    if (!file) {
        fprintf(stderr, "cannot open %s\n", path);
        return NULL;
    }
    if (fseek(file, 0, SEEK_END) != 0 || (length = ftell(file)) < 0 || fseek(file, 0, SEEK_SET) != 0) {
        fclose(file);
        fprintf(stderr, "cannot read %s\n", path);
        return NULL;
    }
    data = (uint8_t *)malloc((size_t)length + 1u);
    if (!data || fread(data, 1, (size_t)length, file) != (size_t)length) {
        fclose(file);
        free(data);
        fprintf(stderr, "cannot read %s\n", path);
        return NULL;
    }
    fclose(file);
    *size = (size_t)length;
    return data;
}

static int write_file(const char *path, const void *data, size_t size) {
    FILE *file = fopen(path, "wb");
    if (!file || fwrite(data, 1, size, file) != size || fclose(file) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
        return 1;
    }
    return 0;
}

static int fail(ea_status status, const char *what) {
    fprintf(stderr, "ea_head_cli: %s: %s (code %d)\n", what, ea_strerror(status), (int)status);
    return 1;
}

static int open_head(const char *path, uint8_t **data, ea_head *head) {
    size_t size;
    ea_status status;
    *data = read_file(path, &size);
    if (!*data) {
        return 1;
    }
    status = ea_head_open(head, *data, size, EA_OPEN_DEFAULT);
    if (status != EA_OK) {
        return fail(status, path);
    }
    return 0;
}

/* N x D float32 rows of a file (the CLI runs on little-endian hosts only). */
static float *read_rows(const char *path, uint32_t dim, size_t *rows) {
    size_t size;
    uint8_t *data = read_file(path, &size);
    if (!data) {
        return NULL;
    }
    if (size % (4u * (size_t)dim) != 0u) {
        fprintf(stderr, "%s has %zu bytes: not a whole number of %u-float rows\n", path, size, dim);
        free(data);
        return NULL;
    }
    *rows = size / (4u * (size_t)dim);
    return (float *)(void *)data;
}

/* ------------------------------------------------------------------ commands */
static int cmd_info(const char *path) {
    uint8_t *data;
    ea_head head;
    uint32_t c;
    int rc = open_head(path, &data, &head);
    if (rc) {
        free(data);
        return rc;
    }
    printf("{\"dim\": %u, \"classes\": %u, \"flags\": %u, \"temperature\": %.9g, \"bytes\": %zu, \"names\": [",
           head.dim, head.classes, head.flags, (double)head.temperature, head.size);
    for (c = 0; c < head.classes; c++) {
        size_t length;
        const char *name = ea_head_class_name(&head, c, &length);
        printf("%s\"%.*s\"", c ? ", " : "", (int)length, name);
    }
    printf("]}\n");
    free(data);
    return 0;
}

static int cmd_logits(const char *head_path, const char *embedding_path, const char *out_path, int top) {
    uint8_t *data;
    ea_head head;
    float *rows = NULL, *scratch = NULL, *logits = NULL;
    uint32_t *indices = NULL;
    size_t count = 0, i;
    int rc = open_head(head_path, &data, &head);
    if (rc == 0) {
        rows = read_rows(embedding_path, head.dim, &count);
        rc = rows ? 0 : 1;
    }
    if (rc == 0) {
        scratch = (float *)malloc(4u * ((size_t)head.dim + (size_t)head.classes));
        logits = (float *)malloc(4u * ((size_t)head.classes * (count ? count : 1u) + 1u));
        indices = (uint32_t *)malloc(4u * ((size_t)head.classes + 1u));
        for (i = 0; i < count && rc == 0; i++) {
            float *row = logits + i * head.classes;
            ea_status status = ea_logits(&head, rows + i * head.dim, head.dim, scratch, head.dim, row, head.classes);
            if (status != EA_OK) {
                rc = fail(status, "logits");
            } else if (top > 0) {
                size_t k = (size_t)top < head.classes ? (size_t)top : head.classes, j;
                float *probs = scratch + head.dim; /* C floats after the D-float feature scratch */
                if (head.classes == 0u) {
                    printf("(no classes)\n");
                    continue;
                }
                status = ea_softmax(row, head.classes, probs);
                if (status == EA_OK) {
                    status = ea_top_k(probs, head.classes, k, indices, NULL);
                }
                if (status != EA_OK) {
                    rc = fail(status, "softmax/top_k");
                    break;
                }
                for (j = 0; j < k; j++) {
                    size_t length;
                    const char *name = ea_head_class_name(&head, indices[j], &length);
                    printf("%s%.*s %.4f", j ? "  " : "", (int)length, name, (double)probs[indices[j]]);
                }
                printf("\n");
            }
        }
        if (rc == 0 && out_path) {
            rc = write_file(out_path, logits, 4u * (size_t)head.classes * count);
        }
    }
    free(data);
    free(rows);
    free(scratch);
    free(logits);
    free(indices);
    return rc;
}

static int cmd_add(int argc, char **argv, int column_only) {
    /* column: HEAD SHOTS OUT [BG Q]; add: HEAD SHOTS NAME OUT [BG Q] */
    int extra = column_only ? 3 : 4;
    uint8_t *data, *out = NULL;
    ea_head head;
    float *shots = NULL, *background = NULL;
    size_t n = 0, m = 0, work_size, written = 0;
    double q = 0.01;
    void *work = NULL;
    ea_status status;
    int rc;
    if (argc != extra && argc != extra + 2) {
        fprintf(stderr, "usage: see the top of edgeadapt_head_cli.c\n");
        return 2;
    }
    rc = open_head(argv[0], &data, &head);
    if (rc == 0) {
        shots = read_rows(argv[1], head.dim, &n);
        rc = shots ? 0 : 1;
    }
    if (rc == 0 && argc == extra + 2) {
        background = read_rows(argv[extra], head.dim, &m);
        q = strtod(argv[extra + 1], NULL);
        rc = background ? 0 : 1;
    }
    if (rc == 0) {
        work_size = ea_add_class_workspace_size(&head, m);
        work = malloc(work_size ? work_size : 1u);
        if (column_only) {
            float *column = (float *)malloc(4u * ((size_t)head.dim + 1u));
            status = ea_prototype_column(&head, shots, n, head.dim, background, m, q, work, work_size, column,
                                         head.dim, column + head.dim);
            rc = status == EA_OK ? write_file(argv[2], column, 4u * ((size_t)head.dim + 1u)) : fail(status, "column");
            free(column);
        } else {
            size_t total = ea_add_class_size(&head, strlen(argv[2]));
            out = (uint8_t *)malloc(total ? total : 1u);
            status = ea_add_class(&head, shots, n, head.dim, background, m, q, argv[2], strlen(argv[2]), work,
                                  work_size, out, total, &written);
            rc = status == EA_OK ? write_file(argv[3], out, written) : fail(status, "add class");
        }
    }
    free(data);
    free(shots);
    free(background);
    free(work);
    free(out);
    return rc;
}

static int cmd_serialize(const char *in_path, const char *out_path) {
    uint8_t *data, *out = NULL;
    ea_head head;
    size_t written;
    int rc = open_head(in_path, &data, &head);
    if (rc == 0) {
        ea_status status;
        out = (uint8_t *)malloc(head.size);
        status = ea_head_serialize(&head, out, head.size, &written);
        rc = status == EA_OK ? write_file(out_path, out, written) : fail(status, "serialize");
    }
    free(data);
    free(out);
    return rc;
}

static int cmd_sha256(const char *path) {
    size_t size, i;
    uint8_t digest[32];
    uint8_t *data = read_file(path, &size);
    if (!data) {
        return 1;
    }
    ea_sha256(data, size, digest);
    for (i = 0; i < 32u; i++) {
        printf("%02x", digest[i]);
    }
    printf("\n");
    free(data);
    return 0;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmd_bench(int argc, char **argv) {
    uint8_t *data, *out = NULL;
    ea_head head, reopened;
    float *rows = NULL, *scratch = NULL, *logits = NULL, *column = NULL, bias;
    size_t count = 0, i, repeats, n, m, work_size, total, written, size;
    void *work = NULL;
    double start, classify_seconds, column_seconds, add_seconds, open_seconds, open_fast_seconds;
    int rc;
    if (argc != 5) {
        fprintf(stderr, "usage: bench HEAD EMB REPEATS SHOTS BACKGROUND\n");
        return 2;
    }
    repeats = (size_t)strtoul(argv[2], NULL, 10);
    n = (size_t)strtoul(argv[3], NULL, 10);
    m = (size_t)strtoul(argv[4], NULL, 10);
    rc = open_head(argv[0], &data, &head);
    if (rc == 0) {
        rows = read_rows(argv[1], head.dim, &count);
        rc = rows && count >= n + m && count > 0 && repeats > 0 && n > 0 ? 0 : 1;
    }
    if (rc == 0) {
        size = head.size;
        start = now_seconds();
        for (i = 0; i < 5u; i++) {
            rc |= ea_head_open(&reopened, data, size, EA_OPEN_DEFAULT) != EA_OK;
        }
        open_seconds = (now_seconds() - start) / 5.0;
        start = now_seconds();
        for (i = 0; i < 5u; i++) {
            rc |= ea_head_open(&reopened, data, size, EA_OPEN_SKIP_CHECKSUM) != EA_OK;
        }
        open_fast_seconds = (now_seconds() - start) / 5.0;
        scratch = (float *)malloc(4u * head.dim);
        logits = (float *)malloc(4u * ((size_t)head.classes + 1u));
        start = now_seconds();
        for (i = 0; i < repeats && rc == 0; i++) {
            ea_status status = ea_logits(&head, rows + (i % count) * head.dim, head.dim, scratch, head.dim, logits,
                                         head.classes);
            if (status != EA_OK) {
                rc = fail(status, "logits");
            }
        }
        classify_seconds = (now_seconds() - start) / (double)repeats;
        work_size = ea_add_class_workspace_size(&head, m);
        work = malloc(work_size);
        column = (float *)malloc(4u * head.dim);
        start = now_seconds();
        for (i = 0; i < 5u && rc == 0; i++) {
            ea_status status = ea_prototype_column(&head, rows, n, head.dim, m ? rows + n * head.dim : NULL, m, 0.01,
                                                   work, work_size, column, head.dim, &bias);
            if (status != EA_OK) {
                rc = fail(status, "column");
            }
        }
        column_seconds = (now_seconds() - start) / 5.0;
        total = ea_add_class_size(&head, 5u);
        out = (uint8_t *)malloc(total);
        start = now_seconds();
        for (i = 0; i < 5u && rc == 0; i++) {
            ea_status status = ea_add_class(&head, rows, n, head.dim, m ? rows + n * head.dim : NULL, m, 0.01,
                                            "bench", 5u, work, work_size, out, total, &written);
            if (status != EA_OK) {
                rc = fail(status, "add class");
            }
        }
        add_seconds = (now_seconds() - start) / 5.0;
        if (rc == 0) {
            printf("{\"seconds_per_classification\": %.9g, \"seconds_per_column\": %.9g, "
                   "\"seconds_per_added_class\": %.9g, \"seconds_per_open\": %.9g, "
                   "\"seconds_per_open_skip_checksum\": %.9g, \"dim\": %u, \"classes\": %u, \"shots\": %zu, "
                   "\"background\": %zu}\n",
                   classify_seconds, column_seconds, add_seconds, open_seconds, open_fast_seconds, head.dim,
                   head.classes, n, m);
        }
    }
    free(data);
    free(rows);
    free(scratch);
    free(logits);
    free(column);
    free(work);
    free(out);
    return rc;
}

/* ------------------------------------------------------------------ fuzz target */
static void violated(const char *what) {
    fprintf(stderr, "fuzz target invariant violated: %s\n", what);
    abort();
}

/* Embedding probe number `which` (D floats), including hostile but finite values. */
static void probe(float *out, uint32_t dim, int which, const uint8_t *data, size_t size) {
    uint32_t d;
    for (d = 0; d < dim; d++) {
        float value;
        switch (which) {
        case 0: value = 0.0f; break;
        case 1: value = (float)((d * 7u) % 13u) - 6.0f; break;
        case 2: value = (d % 2u) ? 3.0e38f : -3.0e38f; break;
        case 3: value = (d % 3u) ? 1.0e-40f : -2.0e-45f; break;
        default: {
            uint32_t bits = 0;
            size_t at = size ? ((size_t)d * 4u + (size_t)which) % size : 0u;
            size_t b;
            for (b = 0; b < 4u && size; b++) {
                bits |= (uint32_t)data[(at + b) % size] << (8u * b);
            }
            if ((bits & 0x7f800000u) == 0x7f800000u) {
                bits = 0x3fc00000u; /* NaN/inf (checked on the bits: no FP compare of a NaN) -> 1.5 */
            }
            memcpy(&value, &bits, 4);
        }
        }
        out[d] = value;
    }
}

/* The fuzz target: open a buffer and, when it opens, drive every API on it, checking invariants. */
/* Returns 0 when the input did not open, 1 when it opened, 2 when a class was also added. */
static int exercise(const uint8_t *data, size_t size) {
    ea_head head, again;
    ea_status status = ea_head_open(&head, data, size, EA_OPEN_SKIP_CHECKSUM);
    ea_status checked = ea_head_open(&again, data, size, EA_OPEN_DEFAULT);
    float *embeddings, *scratch, *logits, *logits_after, *probs;
    uint32_t *indices;
    uint8_t *out;
    void *work;
    size_t D, C, i, k, work_size, total, written = 0;
    int which, outcome;
    if (checked == EA_OK && status != EA_OK) {
        violated("opens with the checksum but not without it");
    }
    (void)ea_strerror(status);
    if (status != EA_OK) {
        if (head.data != NULL) {
            violated("a failed open left a usable head");
        }
        return 0;
    }
    D = head.dim;
    C = head.classes;
    if (D == 0u || head.size > size) {
        violated("open accepted impossible sizes");
    }
    for (i = 0; i < C; i++) {
        size_t length = 0;
        const char *name = ea_head_class_name(&head, (uint32_t)i, &length);
        if (!name || length == 0u || length > EA_MAX_NAME_BYTES) {
            violated("class name");
        }
    }
    if (D > 4096u || C > 4096u) {
        return 1; /* keep executions fast; large heads are covered by the conformance tests */
    }
    embeddings = (float *)malloc(4u * D * 8u);
    scratch = (float *)malloc(4u * D);
    logits = (float *)malloc(4u * (C + 1u));
    logits_after = (float *)malloc(4u * (C + 2u));
    probs = (float *)malloc(4u * (C + 1u));
    indices = (uint32_t *)malloc(4u * (C + 1u));
    for (which = 0; which < 8; which++) {
        probe(embeddings + (size_t)which * D, (uint32_t)D, which, data, size);
    }
    for (which = 0; which < 8; which++) {
        status = ea_logits(&head, embeddings + (size_t)which * D, D, scratch, D, logits, C);
        if (status == EA_OK && C > 0u) {
            float sum = 0.0f;
            if (ea_softmax(logits, C, probs) != EA_OK) {
                violated("softmax refused finite logits");
            }
            for (i = 0; i < C; i++) {
                if (!(probs[i] >= 0.0f && probs[i] <= 1.0f)) {
                    violated("probability outside [0, 1]");
                }
                sum += probs[i];
            }
            if (!(fabsf(sum - 1.0f) < 1e-3f)) {
                violated("probabilities do not sum to 1");
            }
            k = C < 3u ? C : 3u;
            if (ea_top_k(logits, C, k, indices, NULL) != EA_OK) {
                violated("top_k refused finite logits");
            }
            for (i = 1; i < k; i++) {
                if (logits[indices[i]] > logits[indices[i - 1u]]) {
                    violated("top_k order");
                }
            }
        }
    }
    /* add a class from two probes with three as background, then reopen and compare */
    work_size = ea_add_class_workspace_size(&head, 3u);
    total = ea_add_class_size(&head, 2u);
    work = malloc(work_size ? work_size : 1u);
    out = (uint8_t *)malloc(total > head.size ? total : head.size);
    status = ea_add_class(&head, embeddings + 4u * D, 2u, D, embeddings + 5u * D, 3u, 0.3, "fz", 2u, work, work_size,
                          out, total, &written);
    outcome = status == EA_OK ? 2 : 1;
    if (status == EA_OK) {
        ea_head added;
        if (written != total || ea_head_open(&added, out, written, EA_OPEN_DEFAULT) != EA_OK ||
            added.classes != C + 1u) {
            violated("an added-class head does not reopen");
        }
        for (which = 0; which < 8; which++) {
            ea_status before = ea_logits(&head, embeddings + (size_t)which * D, D, scratch, D, logits, C);
            ea_status after = ea_logits(&added, embeddings + (size_t)which * D, D, scratch, D, logits_after, C + 1u);
            if (before == EA_OK && after == EA_OK && memcmp(logits, logits_after, 4u * C) != 0) {
                violated("adding a class changed an old logit");
            }
        }
    }
    status = ea_head_serialize(&head, out, head.size, &written);
    if (status != EA_OK || ea_head_open(&again, out, written, EA_OPEN_DEFAULT) != EA_OK) {
        violated("a serialised head does not reopen");
    }
    free(embeddings);
    free(scratch);
    free(logits);
    free(logits_after);
    free(probs);
    free(indices);
    free(work);
    free(out);
    return outcome;
}

/* ------------------------------------------------------------------ crash capture (CLI only) */
static const uint8_t *current_input;
static size_t current_size;
static int crash_fd = -1;

static void dump_current(void) {
    if (crash_fd >= 0 && current_input) {
        size_t done = 0;
        while (done < current_size) {
            ssize_t wrote = write(crash_fd, current_input + done, current_size - done);
            if (wrote <= 0) {
                break;
            }
            done += (size_t)wrote;
        }
        close(crash_fd);
        crash_fd = -1;
    }
}

static void on_signal(int number) {
    static const char message[] = "ea_head_cli: fuzz target crashed (signal); input saved\n";
    ssize_t ignored = write(2, message, sizeof message - 1u);
    (void)ignored;
    (void)number;
    dump_current();
    signal(number, SIG_DFL);
    _exit(77);
}

#if defined(__GNUC__)
extern void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));
#endif

static void install_crash_capture(const char *crash_path) {
    if (crash_path) {
        crash_fd = open(crash_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    }
    signal(SIGSEGV, on_signal);
    signal(SIGBUS, on_signal);
    signal(SIGFPE, on_signal);
    signal(SIGILL, on_signal);
    signal(SIGABRT, on_signal);
#if defined(__GNUC__)
    if (__sanitizer_set_death_callback) {
        __sanitizer_set_death_callback(dump_current);
    }
#endif
    /* hostile input must not raise invalid/divide-by-zero/overflow: make them crash */
    feenableexcept(FE_INVALID | FE_DIVBYZERO | FE_OVERFLOW);
}

static int cmd_check(int argc, char **argv) {
    int i;
    install_crash_capture(NULL);
    for (i = 0; i < argc; i++) {
        size_t size;
        uint8_t *data = read_file(argv[i], &size);
        if (!data) {
            return 1;
        }
        current_input = data;
        current_size = size;
        exercise(data, size);
        {
            /* again from read-only pages, like flash: a write into the head buffer would fault */
            size_t page = (size_t)sysconf(_SC_PAGESIZE), length = (size + page) / page * page;
            uint8_t *region = (uint8_t *)mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (region != MAP_FAILED) {
                memcpy(region, data, size);
                if (mprotect(region, length, PROT_READ) == 0) {
                    exercise(region, size);
                }
                munmap(region, length);
            }
        }
        free(data);
    }
    printf("checked %d file(s)\n", argc);
    return 0;
}

/* ------------------------------------------------------------------ mutation fuzzer */
static uint64_t next_random(uint64_t *state) {
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return x;
}

static void store32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static uint32_t load32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* One structure-aware mutation of buf (size in *size, capacity cap). */
static void mutate(uint8_t *buf, size_t *size, size_t cap, uint64_t *rng) {
    static const uint32_t interesting[] = {0u, 1u, 2u, 3u, 4u, 7u, 8u, 63u, 64u, 255u, 256u, 0x7fffffffu,
                                           0x80000000u, 0xffffffffu, 0xfffffffeu, EA_MAX_DIM, EA_MAX_DIM + 1u,
                                           EA_MAX_CLASSES, 0x00100001u, 0x40000000u};
    static const uint32_t floats[] = {0x7fc00000u, 0x7f800000u, 0xff800000u, 0x00000000u, 0x80000000u,
                                      0x7f7fffffu, 0xff7fffffu, 0x00000001u, 0x00800000u, 0xbf800000u,
                                      0x3f800000u, 0x7f000000u};
    size_t n = *size;
    uint64_t r = next_random(rng);
    switch (r % 9u) {
    case 0: /* flip a bit */
        if (n) buf[(r >> 8) % n] ^= (uint8_t)(1u << ((r >> 4) & 7u));
        break;
    case 1: /* random byte */
        if (n) buf[(r >> 8) % n] = (uint8_t)(r >> 40);
        break;
    case 2: /* header field (2- or 4-byte aligned, offsets 8..63) gets an interesting value */
        if (n >= EA_HEADER_SIZE) {
            size_t at = 8u + 4u * ((r >> 8) % 14u);
            store32(buf + at, interesting[(r >> 20) % (sizeof interesting / sizeof interesting[0])]);
        }
        break;
    case 3: /* special float at an aligned offset */
        if (n >= 4u) {
            size_t at = 4u * ((r >> 8) % (n / 4u));
            store32(buf + at, floats[(r >> 32) % (sizeof floats / sizeof floats[0])]);
        }
        break;
    case 4: /* truncate */
        if (n) *size = (r >> 8) % n;
        break;
    case 5: /* grow with random bytes */
        {
            size_t extra = 1u + (r >> 8) % 64u, i;
            if (n + extra <= cap) {
                for (i = 0; i < extra; i++) buf[n + i] = (uint8_t)next_random(rng);
                *size = n + extra;
            }
        }
        break;
    case 6: /* delete a chunk */
        if (n > 8u) {
            size_t at = (r >> 8) % n, len = 1u + (r >> 32) % 16u;
            if (at + len > n) len = n - at;
            memmove(buf + at, buf + at + len, n - at - len);
            *size = n - len;
        }
        break;
    case 7: /* duplicate a chunk in place */
        if (n > 8u) {
            size_t from = (r >> 8) % n, to = (r >> 24) % n, len = 1u + (r >> 40) % 32u;
            if (from + len > n) len = n - from;
            if (to + len > n) len = n - to;
            memmove(buf + to, buf + from, len);
        }
        break;
    default: /* add a small integer to a 32-bit word (size lies by a little) */
        if (n >= 4u) {
            size_t at = 4u * ((r >> 8) % (n / 4u));
            store32(buf + at, load32(buf + at) + (uint32_t)((int32_t)((r >> 32) % 9u) - 4));
        }
        break;
    }
}

/* Make a mutated file pass the cheap checks more often: set total_size to the real size and/or
 * recompute the checksum, so that mutations reach the value checks and the maths. */
static void fix_up(uint8_t *buf, size_t size, uint64_t *rng) {
    uint64_t r = next_random(rng);
    if (size < EA_HEADER_SIZE + EA_SHA256_SIZE) {
        return;
    }
    if (r & 1u) {
        store32(buf + 32, (uint32_t)size);
        store32(buf + 36, 0u);
    }
    if (r & 6u) {
        uint64_t total = (uint64_t)load32(buf + 32) | ((uint64_t)load32(buf + 36) << 32);
        if (total >= EA_HEADER_SIZE + EA_SHA256_SIZE && total <= size) {
            ea_sha256(buf, (size_t)total - EA_SHA256_SIZE, buf + total - EA_SHA256_SIZE);
        }
    }
}

/* ------------------------------------------------------------------ coverage feedback
 * When the library objects are compiled with -fsanitize-coverage=trace-pc (the tests and the
 * Makefile's `fuzz` build do so; this file is compiled without it), gcc calls
 * __sanitizer_cov_trace_pc at every basic block of the library. Edges (previous block, block)
 * hash into a map with AFL-style hit-count buckets; a mutated input that reaches a new
 * (edge, bucket) joins the fuzzing pool. Without the flag the callback is never called and the
 * fuzzer is a plain mutation fuzzer over the seeds. */
#define EA_MAP_BITS 16u
#define EA_MAP_SIZE (1u << EA_MAP_BITS)
#define EA_POOL_MAX 4096u
static uint8_t map_run[EA_MAP_SIZE];
static uint8_t map_seen[EA_MAP_SIZE];
static uint32_t map_touched[EA_MAP_SIZE];
static size_t map_touched_count;
static uintptr_t map_previous;

void __sanitizer_cov_trace_pc(void);
void __sanitizer_cov_trace_pc(void) {
    uintptr_t here = (uintptr_t)__builtin_return_address(0);
    uint32_t index = (uint32_t)(((here >> 4) ^ (here << 8) ^ map_previous) & (EA_MAP_SIZE - 1u));
    map_previous = (here >> 4) >> 1;
    if (map_run[index] == 0u) {
        map_touched[map_touched_count++] = index;
    }
    if (map_run[index] != 255u) {
        map_run[index]++;
    }
}

static uint8_t hit_bucket(uint8_t hits) {
    if (hits <= 3u) return (uint8_t)(1u << (hits - 1u));
    if (hits <= 7u) return 8u;
    if (hits <= 15u) return 16u;
    if (hits <= 31u) return 32u;
    if (hits <= 127u) return 64u;
    return 128u;
}

/* Count the (edge, bucket) features of the last run that were never seen, and reset the run. */
static size_t new_features(void) {
    size_t i, fresh = 0;
    for (i = 0; i < map_touched_count; i++) {
        uint32_t index = map_touched[i];
        uint8_t bucket = hit_bucket(map_run[index]);
        if (!(map_seen[index] & bucket)) {
            map_seen[index] |= bucket;
            fresh++;
        }
        map_run[index] = 0u;
    }
    map_touched_count = 0;
    map_previous = 0;
    return fresh;
}

static int cmd_fuzz(int argc, char **argv) {
    double seconds, start;
    unsigned long max_executions, executions = 0, opened = 0, added = 0, features = 0;
    uint64_t rng;
    const char *crash_dir;
    char crash_path[4096];
    uint8_t **seeds = (uint8_t **)calloc(EA_POOL_MAX + 64u, sizeof(uint8_t *));
    size_t *seed_sizes = (size_t *)calloc(EA_POOL_MAX + 64u, sizeof(size_t));
    size_t seed_count = 0, initial, cap = 0, i;
    uint8_t *buf;
    if (argc < 5) {
        fprintf(stderr, "usage: fuzz SECONDS MAX_EXECUTIONS SEED CRASH_DIR SEED_FILE...\n");
        return 2;
    }
    seconds = strtod(argv[0], NULL);
    max_executions = strtoul(argv[1], NULL, 10);
    rng = (uint64_t)strtoull(argv[2], NULL, 10) * 0x9e3779b97f4a7c15ull + 0x1234567ull;
    crash_dir = argv[3];
    for (i = 4; i < (size_t)argc && seed_count < 64u; i++) {
        seeds[seed_count] = read_file(argv[i], &seed_sizes[seed_count]);
        if (!seeds[seed_count]) {
            return 1;
        }
        if (seed_sizes[seed_count] + 4096u > cap) {
            cap = seed_sizes[seed_count] + 4096u;
        }
        seed_count++;
    }
    initial = seed_count;
    install_crash_capture(NULL);
    for (i = 0; i < initial; i++) { /* the seeds' own coverage is not "new" */
        current_input = seeds[i];
        current_size = seed_sizes[i];
        exercise(seeds[i], seed_sizes[i]);
        features += new_features();
    }
    snprintf(crash_path, sizeof crash_path, "%s/crash-seed%s.eah", crash_dir, argv[2]);
    buf = (uint8_t *)malloc(cap);
    start = now_seconds();
    while ((max_executions == 0u || executions < max_executions) && now_seconds() - start < seconds) {
        size_t pick = (size_t)(next_random(&rng) % seed_count), size = seed_sizes[pick];
        int rounds = 1 + (int)(next_random(&rng) % 4u), round;
        memcpy(buf, seeds[pick], size);
        for (round = 0; round < rounds; round++) {
            mutate(buf, &size, cap, &rng);
        }
        fix_up(buf, size, &rng);
        current_input = buf;
        current_size = size;
        if (crash_fd < 0) {
            crash_fd = open(crash_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        }
        switch (exercise(buf, size)) {
        case 2: added++; /* fall through */
        case 1: opened++; break;
        default: break;
        }
        executions++;
        {
            size_t fresh = new_features();
            features += fresh;
            if (fresh && seed_count < EA_POOL_MAX + 64u && size > 0u) {
                seeds[seed_count] = (uint8_t *)malloc(size);
                memcpy(seeds[seed_count], buf, size);
                seed_sizes[seed_count++] = size;
            }
        }
    }
    if (crash_fd >= 0) {
        close(crash_fd);
        crash_fd = -1;
        unlink(crash_path); /* no crash: remove the empty capture file */
    }
    printf("{\"executions\": %lu, \"opened\": %lu, \"added_class\": %lu, \"coverage_features\": %lu, "
           "\"pool\": %zu, \"seconds\": %.3f}\n",
           executions, opened, added, features, seed_count - initial, now_seconds() - start);
    for (i = 0; i < seed_count; i++) {
        free(seeds[i]);
    }
    free(seeds);
    free(seed_sizes);
    free(buf);
    return 0;
}

int main(int argc, char **argv) {
    const char *command = argc > 1 ? argv[1] : "";
    if (strcmp(command, "info") == 0 && argc == 3) return cmd_info(argv[2]);
    if (strcmp(command, "logits") == 0 && argc == 5) return cmd_logits(argv[2], argv[3], argv[4], 0);
    if (strcmp(command, "classify") == 0 && (argc == 4 || argc == 5))
        return cmd_logits(argv[2], argv[3], NULL, argc == 5 ? atoi(argv[4]) : 3);
    if (strcmp(command, "column") == 0) return cmd_add(argc - 2, argv + 2, 1);
    if (strcmp(command, "add") == 0) return cmd_add(argc - 2, argv + 2, 0);
    if (strcmp(command, "serialize") == 0 && argc == 4) return cmd_serialize(argv[2], argv[3]);
    if (strcmp(command, "sha256") == 0 && argc == 3) return cmd_sha256(argv[2]);
    if (strcmp(command, "bench") == 0) return cmd_bench(argc - 2, argv + 2);
    if (strcmp(command, "check") == 0 && argc >= 3) return cmd_check(argc - 2, argv + 2);
    if (strcmp(command, "fuzz") == 0) return cmd_fuzz(argc - 2, argv + 2);
    fprintf(stderr,
            "usage: ea_head_cli info|logits|classify|column|add|serialize|sha256|bench|check|fuzz ...\n"
            "(see the comment at the top of edgeadapt_head_cli.c)\n");
    return 2;
}
