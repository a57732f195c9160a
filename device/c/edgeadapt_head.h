/*
 * edgeadapt_head.h - the edgeadapt classifier head for firmware (C99, libc only).
 *
 * Reads a flat head file (.eah, written by `edgeadapt export-head`) from a caller buffer
 * (flash or RAM), classifies one embedding (the backbone's output) and adds a class from a
 * few embeddings, writing the updated head into a caller buffer.
 *
 *   - no malloc, no global or static mutable state: every function works on caller memory;
 *   - every size declared in a file is checked against the buffer with overflow-safe
 *     arithmetic before use; the sha256 of the file is checked at open;
 *   - non-finite numbers in a file are refused at open, non-finite inputs are refused per
 *     call, and results that would not fit a float are reported (EA_ERR_RANGE) instead of
 *     producing inf/NaN: hostile input raises no floating-point exception that matters
 *     (no invalid operation, no division by zero, no overflow);
 *   - the head buffer is only read, never written; it must stay valid while the ea_head is used.
 *
 * The maths is that of edgeadapt.device.head.Head:
 *   f = e - feature_mean                 (if the head has a feature mean)
 *   f = f / max(||f||, 1e-12)            (if the head L2-normalises)
 *   logits = (f . W + b) / temperature
 * See docs/C_LIBRARY.md for the file layout byte by byte.
 */
#ifndef EDGEADAPT_HEAD_H
#define EDGEADAPT_HEAD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EA_FORMAT_VERSION 1u
#define EA_HEADER_SIZE 64u
#define EA_SHA256_SIZE 32u
/* Limits that every reader (C and Python) enforces. */
#define EA_MAX_DIM (1u << 20)        /* embedding size D: 1 .. EA_MAX_DIM */
#define EA_MAX_CLASSES (1u << 20)    /* classes C: 0 .. EA_MAX_CLASSES */
#define EA_MAX_NAME_BYTES 255u       /* UTF-8 bytes of one class name: 1 .. 255 */
/* float32 weights satisfy |w| <= 2^64 (so sums can run in float; see docs/C_LIBRARY.md) */

/* Header flags. */
#define EA_FLAG_FEATURE_MEAN 0x1u    /* a D-float feature mean follows the header */
#define EA_FLAG_L2_NORMALIZE 0x2u    /* features are L2-normalised */
#define EA_FLAG_INT8 0x4u            /* weights are int8 with one float scale per class */
#define EA_FLAGS_KNOWN 0x7u

/* Options of ea_head_open. */
#define EA_OPEN_DEFAULT 0u
/* Skip the sha256 check (e.g. a bootloader verified the flash image already). Sizes and
 * values are still validated in full. */
#define EA_OPEN_SKIP_CHECKSUM 0x1u

typedef enum {
    EA_OK = 0,
    EA_ERR_NULL,              /* a required pointer argument is NULL */
    EA_ERR_TRUNCATED,         /* the buffer is shorter than the header or the declared file size */
    EA_ERR_MAGIC,             /* not a head file (wrong magic bytes) */
    EA_ERR_VERSION,           /* unsupported format version */
    EA_ERR_HEADER,            /* header size, flags or reserved bytes invalid */
    EA_ERR_LIMIT,             /* D or C out of range, or the sizes overflow */
    EA_ERR_SIZE,              /* declared sizes do not add up to the declared file size */
    EA_ERR_CHECKSUM,          /* sha256 mismatch: corrupted or edited */
    EA_ERR_NON_FINITE,        /* NaN/inf, |weight| > 2^64, temperature <= 0, int8 scale <= 0 or > FLT_MAX/128 */
    EA_ERR_NAMES,             /* class name table invalid */
    EA_ERR_DIM,               /* an embedding length does not match the head */
    EA_ERR_BUFFER,            /* a caller output/work buffer is too small */
    EA_ERR_ARGUMENT,          /* an argument is out of range (k, n, index, claim budget, name) */
    EA_ERR_INPUT,             /* an input embedding or score contains NaN/inf */
    EA_ERR_RANGE,             /* a result would not fit a float (input far outside the head's range) */
    EA_ERR_DEGENERATE,        /* the shots' mean feature is zero: no direction for a new class */
    EA_ERR_COUNT              /* number of codes (not an error) */
} ea_status;

/* A short English description of a status code (never NULL). */
const char *ea_strerror(ea_status status);

/* A validated view of a head file. Filled by ea_head_open; fields are read-only for callers. */
typedef struct {
    const uint8_t *data;     /* the caller's buffer */
    size_t size;             /* bytes of the head file (header.total_size) */
    uint32_t dim;            /* D */
    uint32_t classes;        /* C */
    uint32_t flags;          /* EA_FLAG_* */
    float temperature;
    uint32_t names_bytes;
    size_t off_mean, off_weights, off_scales, off_bias, off_name_offsets, off_names;
} ea_head;

/* Validate the head file in buffer[0..size) and fill *head. The buffer may be longer than
 * the file (e.g. a flash partition). Nothing is written to buffer. */
ea_status ea_head_open(ea_head *head, const void *buffer, size_t size, uint32_t options);

uint32_t ea_head_dim(const ea_head *head);
uint32_t ea_head_num_classes(const ea_head *head);
/* Name of class index (UTF-8, NOT NUL-terminated; its length goes to *length), or NULL. */
const char *ea_head_class_name(const ea_head *head, uint32_t index, size_t *length);

/* Normalised features of one embedding (dim floats) into features (features_len >= D). */
ea_status ea_features(const ea_head *head, const float *embedding, size_t dim, float *features,
                      size_t features_len);

/* Logits of one embedding into logits[0..C). scratch: at least D floats (caller workspace). */
ea_status ea_logits(const ea_head *head, const float *embedding, size_t dim, float *scratch,
                    size_t scratch_len, float *logits, size_t logits_len);

/* Softmax of n finite scores into probabilities (may alias scores). */
ea_status ea_softmax(const float *scores, size_t n, float *probabilities);

/* The k largest of n finite scores, best first (ties: lower index first). values may be NULL. */
ea_status ea_top_k(const float *scores, size_t n, size_t k, uint32_t *indices, float *values);

/* Adding a class ("prototype" method, docs/C_LIBRARY.md; Python: edgeadapt.device.prototype_column):
 *   f = features(e) for each of the n shots; p = mean f; u = p / ||p||;
 *   column w = s u with s = mean L2 norm of the existing columns (16 when C = 0);
 *   bias: with m >= 1 background embeddings and a claim budget q in (0, 1): for each background
 *   x, r(x) = max_c (f(x).w_c + b_c) - f(x).w; b = the ceil((1-q) m)-th largest r(x), rounded
 *   down to float, so the new class beats the best existing class on at most q m of the
 *   background. Otherwise (no background, or C = 0) b = mean of the existing biases (0 when C = 0).
 *   Floor (C >= 1): b is raised, if needed, to the smallest float above max_c (p.w_c + b_c) - p.w
 *   with p the prototype rounded to float: the class always wins at the mean of its own shots.
 * The new class is appended last; every existing byte of the head is copied unchanged, so
 * every old logit stays bit-identical. An int8 head gets the new column quantised with its
 * own scale (max |w| / 127).
 */

/* Bytes of the head file after adding one class named with name_len bytes (0 if too large). */
size_t ea_add_class_size(const ea_head *head, size_t name_len);
/* Bytes of the workspace that ea_add_class needs for m background embeddings (0 if too large). */
size_t ea_add_class_workspace_size(const ea_head *head, size_t m);

/* The new column and bias only (column: D floats). work: ea_add_class_workspace_size bytes. */
ea_status ea_prototype_column(const ea_head *head, const float *shots, size_t n, size_t dim,
                              const float *background, size_t m, double claim_budget, void *work,
                              size_t work_size, float *column, size_t column_len, float *bias);

/* Write the head with one class appended (a complete, checksummed head file) into out;
 * *written receives its size. The input head is not modified. The head buffer, work and out
 * must not overlap (EA_ERR_ARGUMENT). */
ea_status ea_add_class(const ea_head *head, const float *shots, size_t n, size_t dim,
                       const float *background, size_t m, double claim_budget, const char *name,
                       size_t name_len, void *work, size_t work_size, uint8_t *out, size_t out_size,
                       size_t *written);

/* Write a head file holding exactly this head (re-checksummed) into out; *written gets its size. */
ea_status ea_head_serialize(const ea_head *head, uint8_t *out, size_t out_size, size_t *written);

/* sha256 of data (exposed for tests and for firmware that checks images itself). */
void ea_sha256(const void *data, size_t size, uint8_t digest[32]);

#ifdef __cplusplus
}
#endif
#endif /* EDGEADAPT_HEAD_H */
