/*
 * classify_and_add.c - the edgeadapt head library the way firmware uses it: static buffers,
 * no malloc. On a device the head lives in flash and the embedding comes from the backbone's
 * output tensor (TFLite Micro); here both come from files so the example runs on a PC.
 *
 *   ./classify_and_add HEAD.eah EMBEDDING.f32 SHOTS.f32 NEW_NAME OUT.eah [BACKGROUND.f32]
 *
 * 1. opens and validates HEAD.eah (magic, sizes, sha256, finite values);
 * 2. classifies the first embedding of EMBEDDING.f32 (top 3);
 * 3. adds the class NEW_NAME from the embeddings in SHOTS.f32; with BACKGROUND.f32 (embeddings of
 *    other things the device sees) the bias lets the new class claim at most 5% of them, without
 *    it the bias is the mean of the old biases;
 * 4. writes the updated head to OUT.eah and classifies the embedding again.
 * Embedding files are raw little-endian float32, D values per embedding. Exit status: 0 ok,
 * 1 error (a library status or a file), 2 usage.
 */
#include <stdio.h>
#include <string.h>

#include "edgeadapt_head.h"

#define MAX_HEAD_BYTES (8u << 20)  /* a 1000 x 1280 float32 head is 5.1 MB */
#define MAX_DIM 2048u
#define MAX_CLASSES 4096u
#define MAX_SHOTS 32u
#define MAX_BACKGROUND 256u
#define CLAIM_BUDGET 0.05

/* Static storage, as firmware would reserve it (RAM or a flash partition for the heads). */
static uint8_t head_buffer[MAX_HEAD_BYTES];
static uint8_t new_head_buffer[MAX_HEAD_BYTES];
static float embedding[MAX_DIM];
static float shots[MAX_SHOTS * MAX_DIM];
static float background[MAX_BACKGROUND * MAX_DIM];
static float scratch[MAX_DIM];
static float logits[MAX_CLASSES];
static float probabilities[MAX_CLASSES];
static double workspace[2u * MAX_DIM + MAX_BACKGROUND + 1u]; /* >= ea_add_class_workspace_size(head, m) */

static size_t load(const char *path, void *buffer, size_t capacity) {
    FILE *file = fopen(path, "rb");
    size_t size;
    if (!file) {
        fprintf(stderr, "cannot open %s\n", path);
        return 0;
    }
    size = fread(buffer, 1, capacity, file);
    fclose(file);
    return size;
}

static int print_top3(const ea_head *head, const float *e) {
    uint32_t top[3];
    size_t k = head->classes < 3u ? head->classes : 3u, i;
    ea_status status = ea_logits(head, e, head->dim, scratch, MAX_DIM, logits, MAX_CLASSES);
    if (status == EA_OK) status = ea_softmax(logits, head->classes, probabilities);
    if (status == EA_OK) status = ea_top_k(probabilities, head->classes, k, top, NULL);
    if (status != EA_OK) {
        fprintf(stderr, "classify: %s\n", ea_strerror(status));
        return 1;
    }
    for (i = 0; i < k; i++) {
        size_t length;
        const char *name = ea_head_class_name(head, top[i], &length);
        printf("  %d. %.*s  %.3f\n", (int)i + 1, (int)length, name, (double)probabilities[top[i]]);
    }
    return 0;
}

int main(int argc, char **argv) {
    ea_head head, updated;
    size_t head_size, shot_bytes, written, m = 0;
    ea_status status;
    FILE *out;
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: %s HEAD.eah EMBEDDING.f32 SHOTS.f32 NEW_NAME OUT.eah [BACKGROUND.f32]\n", argv[0]);
        return 2;
    }
    head_size = load(argv[1], head_buffer, sizeof head_buffer);
    status = ea_head_open(&head, head_buffer, head_size, EA_OPEN_DEFAULT);
    if (status != EA_OK) {
        fprintf(stderr, "%s: %s\n", argv[1], ea_strerror(status));
        return 1;
    }
    if (head.dim > MAX_DIM || head.classes + 1u > MAX_CLASSES ||
        ea_add_class_workspace_size(&head, MAX_BACKGROUND) > sizeof workspace) {
        fprintf(stderr, "head too large for this example's static buffers\n");
        return 1;
    }
    printf("head: %u-d embeddings, %u classes, %zu bytes\n", head.dim, head.classes, head.size);
    if (load(argv[2], embedding, sizeof(float) * head.dim) != sizeof(float) * head.dim) {
        fprintf(stderr, "%s: need at least one %u-float embedding\n", argv[2], head.dim);
        return 1;
    }
    printf("before:\n");
    if (print_top3(&head, embedding)) return 1;

    shot_bytes = load(argv[3], shots, sizeof shots);
    if (argc == 7) {
        m = load(argv[6], background, sizeof background) / (sizeof(float) * head.dim);
    }
    status = ea_add_class(&head, shots, shot_bytes / (sizeof(float) * head.dim), head.dim, m ? background : NULL, m,
                          CLAIM_BUDGET, argv[4],
                          strlen(argv[4]), workspace, sizeof workspace, new_head_buffer, sizeof new_head_buffer,
                          &written);
    if (status == EA_OK) status = ea_head_open(&updated, new_head_buffer, written, EA_OPEN_DEFAULT);
    if (status != EA_OK) {
        fprintf(stderr, "add class: %s\n", ea_strerror(status));
        return 1;
    }
    out = fopen(argv[5], "wb");
    if (!out || fwrite(new_head_buffer, 1, written, out) != written || fclose(out) != 0) {
        fprintf(stderr, "cannot write %s\n", argv[5]);
        return 1;
    }
    printf("added \"%s\" from %zu shot(s), %zu background embedding(s): %u classes, wrote %s (%zu bytes)\n"
           "after:\n", argv[4], shot_bytes / (sizeof(float) * head.dim), m, updated.classes, argv[5], written);
    return print_top3(&updated, embedding) ? 1 : 0;
}
