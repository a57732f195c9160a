/*
 * edgeadapt_head.c - open, classify, add a class, serialise (see edgeadapt_head.h).
 * C99, libc only (string.h, math.h, float.h); no malloc, no mutable globals.
 */
#include "edgeadapt_head.h"

#include <float.h>
#include <math.h>
#include <string.h>

static const uint8_t ea_magic[8] = {0x89u, 'E', 'A', 'H', '\r', '\n', 0x1au, '\n'};

/* Header field offsets (all little-endian). */
#define EA_OFF_VERSION 8u
#define EA_OFF_HEADER_SIZE 10u
#define EA_OFF_FLAGS 12u
#define EA_OFF_DIM 16u
#define EA_OFF_CLASSES 20u
#define EA_OFF_TEMPERATURE 24u
#define EA_OFF_NAMES_BYTES 28u
#define EA_OFF_TOTAL_SIZE 32u
#define EA_OFF_RESERVED 40u
/* |float weight| <= 2^64 (bits of 2^64 as a float: exponent 64 + 127 = 191) */
#define EA_MAX_ABS_WEIGHT 18446744073709551616.0
#define EA_MAX_ABS_WEIGHT_BITS 0x5f800000u

/* A switch of string literals: no table of pointers, so no data section at all. */
const char *ea_strerror(ea_status status) {
    switch (status) {
    case EA_OK: return "ok";
    case EA_ERR_NULL: return "a required pointer argument is NULL";
    case EA_ERR_TRUNCATED: return "the buffer is shorter than the head file header or its declared size (truncated file?)";
    case EA_ERR_MAGIC: return "not an edgeadapt head file (bad magic bytes)";
    case EA_ERR_VERSION: return "unsupported head file format version; re-export the head with this library's version";
    case EA_ERR_HEADER: return "invalid head file header (header size, unknown flags or non-zero reserved bytes)";
    case EA_ERR_LIMIT: return "embedding size or class count out of range, or the declared sizes overflow";
    case EA_ERR_SIZE: return "declared section sizes do not add up to the declared file size";
    case EA_ERR_CHECKSUM: return "sha256 checksum mismatch: the head file is corrupted or was edited; re-export it";
    case EA_ERR_NON_FINITE: return "the head file holds NaN/inf, a weight beyond +-2^64, a non-positive temperature or an int8 scale <= 0 or > FLT_MAX/128";
    case EA_ERR_NAMES: return "invalid class name table in the head file";
    case EA_ERR_DIM: return "the embedding length does not match the head's embedding size";
    case EA_ERR_BUFFER: return "a caller buffer is too small (ask the matching *_size function)";
    case EA_ERR_ARGUMENT: return "an argument is out of range";
    case EA_ERR_INPUT: return "an input embedding or score contains NaN or inf";
    case EA_ERR_RANGE: return "a result does not fit a float: the input is far outside the head's range";
    case EA_ERR_DEGENERATE: return "the shots' mean feature is zero, so the new class has no direction; give other examples";
    case EA_ERR_COUNT: break;
    }
    return "unknown edgeadapt status code";
}

/* ------------------------------------------------------------------ little-endian access */
static uint32_t ld_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint16_t ld_u16(const uint8_t *p) { return (uint16_t)((uint32_t)p[0] | ((uint32_t)p[1] << 8)); }
static uint64_t ld_u64(const uint8_t *p) { return (uint64_t)ld_u32(p) | ((uint64_t)ld_u32(p + 4) << 32); }
static float ld_f32(const uint8_t *p) {
    uint32_t bits = ld_u32(p);
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}
static void st_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static void st_u64(uint8_t *p, uint64_t v) { st_u32(p, (uint32_t)v); st_u32(p + 4, (uint32_t)(v >> 32)); }
static void st_f32(uint8_t *p, float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    st_u32(p, bits);
}

/* A float is finite when its exponent bits are not all ones (no FP operation involved). */
static int finite_bits(uint32_t bits) { return (bits & 0x7f800000u) != 0x7f800000u; }
static int finite_f32(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return finite_bits(bits);
}

/* ------------------------------------------------------------------ layout arithmetic */
typedef struct {
    uint64_t mean, weights, scales, bias, name_offsets, names, checksum, total;
} ea_layout;

/* Section offsets for D, C, flags and names_bytes, in 64-bit arithmetic. D <= 2^20 and
 * C <= 2^20 + 1 keep every product below 2^45, so nothing here can wrap. */
static void layout_of(uint64_t dim, uint64_t classes, uint32_t flags, uint64_t names_bytes, ea_layout *out) {
    uint64_t weight_bytes;
    uint64_t at = EA_HEADER_SIZE;
    out->mean = at;
    if (flags & EA_FLAG_FEATURE_MEAN) {
        at += 4u * dim;
    }
    out->weights = at;
    if (flags & EA_FLAG_INT8) {
        weight_bytes = dim * classes;
        weight_bytes = (weight_bytes + 3u) & ~(uint64_t)3u;
    } else {
        weight_bytes = 4u * dim * classes;
    }
    at += weight_bytes;
    out->scales = at;
    if (flags & EA_FLAG_INT8) {
        at += 4u * classes;
    }
    out->bias = at;
    at += 4u * classes;
    out->name_offsets = at;
    at += 4u * (classes + 1u);
    out->names = at;
    at += names_bytes;
    out->checksum = at;
    out->total = at + EA_SHA256_SIZE;
}

static int name_byte_ok(uint8_t byte) { return byte >= 32u && byte != 127u; }

/* ------------------------------------------------------------------ open */
ea_status ea_head_open(ea_head *head, const void *buffer, size_t size, uint32_t options) {
    const uint8_t *data = (const uint8_t *)buffer;
    uint32_t flags, dim, classes, names_bytes, i;
    uint64_t total, count;
    float temperature;
    ea_layout layout;
    if (head == NULL || buffer == NULL) {
        return EA_ERR_NULL;
    }
    memset(head, 0, sizeof *head);
    if (size < EA_HEADER_SIZE) {
        return EA_ERR_TRUNCATED;
    }
    if (memcmp(data, ea_magic, sizeof ea_magic) != 0) {
        return EA_ERR_MAGIC;
    }
    if (ld_u16(data + EA_OFF_VERSION) != EA_FORMAT_VERSION) {
        return EA_ERR_VERSION;
    }
    flags = ld_u32(data + EA_OFF_FLAGS);
    if (ld_u16(data + EA_OFF_HEADER_SIZE) != EA_HEADER_SIZE || (flags & ~EA_FLAGS_KNOWN) != 0u) {
        return EA_ERR_HEADER;
    }
    for (i = EA_OFF_RESERVED; i < EA_HEADER_SIZE; i++) {
        if (data[i] != 0u) {
            return EA_ERR_HEADER;
        }
    }
    dim = ld_u32(data + EA_OFF_DIM);
    classes = ld_u32(data + EA_OFF_CLASSES);
    names_bytes = ld_u32(data + EA_OFF_NAMES_BYTES);
    total = ld_u64(data + EA_OFF_TOTAL_SIZE);
    if (dim == 0u || dim > EA_MAX_DIM || classes > EA_MAX_CLASSES ||
        (uint64_t)names_bytes > (uint64_t)classes * EA_MAX_NAME_BYTES) {
        return EA_ERR_LIMIT;
    }
    layout_of(dim, classes, flags, names_bytes, &layout);
    if (layout.total > (uint64_t)SIZE_MAX) {
        return EA_ERR_LIMIT;
    }
    if (total != layout.total) {
        return EA_ERR_SIZE;
    }
    if ((uint64_t)size < total) {
        return EA_ERR_TRUNCATED;
    }
    if (!(options & EA_OPEN_SKIP_CHECKSUM)) {
        uint8_t digest[EA_SHA256_SIZE];
        ea_sha256(data, (size_t)layout.checksum, digest);
        if (memcmp(digest, data + layout.checksum, EA_SHA256_SIZE) != 0) {
            return EA_ERR_CHECKSUM;
        }
    }
    temperature = ld_f32(data + EA_OFF_TEMPERATURE);
    if (!finite_f32(temperature) || !(temperature > 0.0f)) {
        return EA_ERR_NON_FINITE;
    }
    /* every stored float must be finite (checked on the bits: no FP operation on NaN) */
    if (flags & EA_FLAG_FEATURE_MEAN) {
        for (count = 0; count < dim; count++) {
            if (!finite_bits(ld_u32(data + layout.mean + 4u * count))) {
                return EA_ERR_NON_FINITE;
            }
        }
    }
    if (flags & EA_FLAG_INT8) {
        for (count = 0; count < classes; count++) {
            float scale = ld_f32(data + layout.scales + 4u * count);
            /* 128 * scale (q = -128) must fit a float too, so that every dequantised weight is finite */
            if (!finite_f32(scale) || !(scale > 0.0f) || (double)scale * 128.0 > (double)FLT_MAX) {
                return EA_ERR_NON_FINITE;
            }
        }
        for (count = (uint64_t)dim * classes; count < layout.scales - layout.weights; count++) {
            if (data[layout.weights + count] != 0u) {
                return EA_ERR_HEADER; /* padding must be zero */
            }
        }
    } else {
        uint64_t values = (uint64_t)dim * classes;
        for (count = 0; count < values; count++) {
            /* finite positive floats order like their bit patterns: |w| <= 2^64 without FP operations */
            uint32_t magnitude = ld_u32(data + layout.weights + 4u * count) & 0x7fffffffu;
            if (magnitude > EA_MAX_ABS_WEIGHT_BITS) {
                return EA_ERR_NON_FINITE;
            }
        }
    }
    for (count = 0; count < classes; count++) {
        if (!finite_bits(ld_u32(data + layout.bias + 4u * count))) {
            return EA_ERR_NON_FINITE;
        }
    }
    /* names: offsets[0] = 0, each name 1..255 bytes, offsets[C] = names_bytes, printable bytes */
    {
        uint32_t previous = ld_u32(data + layout.name_offsets);
        if (previous != 0u) {
            return EA_ERR_NAMES;
        }
        for (count = 1; count <= classes; count++) {
            uint32_t next = ld_u32(data + layout.name_offsets + 4u * count);
            if (next <= previous || next - previous > EA_MAX_NAME_BYTES || next > names_bytes) {
                return EA_ERR_NAMES;
            }
            previous = next;
        }
        if (previous != names_bytes) {
            return EA_ERR_NAMES;
        }
        for (count = 0; count < names_bytes; count++) {
            if (!name_byte_ok(data[layout.names + count])) {
                return EA_ERR_NAMES;
            }
        }
    }
    head->data = data;
    head->size = (size_t)total;
    head->dim = dim;
    head->classes = classes;
    head->flags = flags;
    head->temperature = temperature;
    head->names_bytes = names_bytes;
    head->off_mean = (size_t)layout.mean;
    head->off_weights = (size_t)layout.weights;
    head->off_scales = (size_t)layout.scales;
    head->off_bias = (size_t)layout.bias;
    head->off_name_offsets = (size_t)layout.name_offsets;
    head->off_names = (size_t)layout.names;
    return EA_OK;
}

uint32_t ea_head_dim(const ea_head *head) { return head ? head->dim : 0u; }
uint32_t ea_head_num_classes(const ea_head *head) { return head ? head->classes : 0u; }

const char *ea_head_class_name(const ea_head *head, uint32_t index, size_t *length) {
    uint32_t start, end;
    if (head == NULL || head->data == NULL || index >= head->classes) {
        return NULL;
    }
    start = ld_u32(head->data + head->off_name_offsets + 4u * (size_t)index);
    end = ld_u32(head->data + head->off_name_offsets + 4u * ((size_t)index + 1u));
    if (length) {
        *length = (size_t)(end - start);
    }
    return (const char *)(head->data + head->off_names + start);
}

/* ------------------------------------------------------------------ classification */
static ea_status check_head(const ea_head *head) {
    if (head == NULL || head->data == NULL) {
        return EA_ERR_NULL;
    }
    return EA_OK;
}

ea_status ea_features(const ea_head *head, const float *embedding, size_t dim, float *features,
                      size_t features_len) {
    size_t d, D;
    double squares = 0.0;
    ea_status status = check_head(head);
    if (status != EA_OK) {
        return status;
    }
    if (embedding == NULL || features == NULL) {
        return EA_ERR_NULL;
    }
    D = head->dim;
    if (dim != D) {
        return EA_ERR_DIM;
    }
    if (features_len < D) {
        return EA_ERR_BUFFER;
    }
    for (d = 0; d < D; d++) {
        if (!finite_f32(embedding[d])) {
            return EA_ERR_INPUT;
        }
    }
    for (d = 0; d < D; d++) {
        /* float32 e - mean exactly as numpy (double then rounded to float is correctly
         * rounded), with the overflow checked before the conversion */
        double centred = (double)embedding[d];
        if (head->flags & EA_FLAG_FEATURE_MEAN) {
            centred -= (double)ld_f32(head->data + head->off_mean + 4u * d);
            if (fabs(centred) > (double)FLT_MAX) {
                return EA_ERR_RANGE;
            }
        }
        features[d] = (float)centred;
        squares += (double)features[d] * (double)features[d];
    }
    if (head->flags & EA_FLAG_L2_NORMALIZE) {
        double norm = sqrt(squares);
        /* numpy: f / max(float32(norm), 1e-12f) in float32; dividing in double and rounding
         * to float gives the same correctly rounded quotient */
        double divisor = norm <= (double)FLT_MAX ? (double)(float)norm : norm;
        if (divisor < (double)1e-12f) {
            divisor = (double)1e-12f;
        }
        for (d = 0; d < D; d++) {
            double value = (double)features[d] / divisor;
            if (fabs(value) > (double)FLT_MAX) {
                return EA_ERR_RANGE;
            }
            features[d] = (float)value;
        }
    }
    return EA_OK;
}

/* Whether f . w_c can be summed in float for every class without overflow: every partial sum
 * is at most sum |f_d w_d| <= ||f|| sqrt(D) max|w| (Cauchy-Schwarz), max|w| <= 2^64 by the format
 * (128 for int8, whose scale is applied after the sum), and float rounding adds at most a factor
 * 1 + D eps < 2 (D <= 2^20). The choice depends only on the features and the format, never on
 * the other classes, so adding a class cannot change an old logit. Real heads and embeddings are
 * far inside the bound; hostile inputs (|values| near FLT_MAX) take the double path, which cannot
 * overflow. */
static int float_sums_safe(const ea_head *head, const float *features) {
    size_t d;
    double squares = 0.0;
    double bound = (head->flags & EA_FLAG_INT8) ? 128.0 : EA_MAX_ABS_WEIGHT;
    for (d = 0; d < head->dim; d++) {
        squares += (double)features[d] * (double)features[d];
    }
    return sqrt(squares) * sqrt((double)head->dim) * bound <= (double)FLT_MAX / 4.0;
}

/* f . column c in EA_LANES independent lanes that the compiler vectorises. In float when
 * float_sums_safe said so (fast on FPUs without double, like the Cortex-M4F), else in double,
 * which cannot overflow for finite float inputs (|sum| <= 2^20 FLT_MAX^2 < DBL_MAX). */
#define EA_LANES 8u
static double column_dot(const ea_head *head, const float *features, uint32_t c, int in_float) {
    size_t D = head->dim, d = 0, lane;
    double total = 0.0;
    const int8_t *q = (const int8_t *)(const void *)(head->data + head->off_weights + (size_t)c * D);
    const uint8_t *w = head->data + head->off_weights + 4u * (size_t)c * D;
    int int8 = (head->flags & EA_FLAG_INT8) != 0u;
    if (in_float) {
        float sums[EA_LANES] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (int8) {
            for (; d + EA_LANES <= D; d += EA_LANES) {
                for (lane = 0; lane < EA_LANES; lane++) {
                    sums[lane] += features[d + lane] * (float)q[d + lane];
                }
            }
            for (; d < D; d++) {
                sums[0] += features[d] * (float)q[d];
            }
        } else {
            for (; d + EA_LANES <= D; d += EA_LANES) {
                for (lane = 0; lane < EA_LANES; lane++) {
                    sums[lane] += features[d + lane] * ld_f32(w + 4u * (d + lane));
                }
            }
            for (; d < D; d++) {
                sums[0] += features[d] * ld_f32(w + 4u * d);
            }
        }
        for (lane = 0; lane < EA_LANES; lane++) {
            total += (double)sums[lane];
        }
    } else {
        double sums[EA_LANES] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        for (; d + EA_LANES <= D; d += EA_LANES) {
            for (lane = 0; lane < EA_LANES; lane++) {
                double weight = int8 ? (double)q[d + lane] : (double)ld_f32(w + 4u * (d + lane));
                sums[lane] += (double)features[d + lane] * weight;
            }
        }
        for (; d < D; d++) {
            sums[0] += (double)features[d] * (int8 ? (double)q[d] : (double)ld_f32(w + 4u * d));
        }
        for (lane = 0; lane < EA_LANES; lane++) {
            total += sums[lane];
        }
    }
    if (int8) {
        total *= (double)ld_f32(head->data + head->off_scales + 4u * (size_t)c);
    }
    return total;
}

static double bias_of(const ea_head *head, uint32_t c) {
    return (double)ld_f32(head->data + head->off_bias + 4u * (size_t)c);
}

ea_status ea_logits(const ea_head *head, const float *embedding, size_t dim, float *scratch,
                    size_t scratch_len, float *logits, size_t logits_len) {
    uint32_t c;
    int in_float;
    ea_status status = check_head(head);
    if (status != EA_OK) {
        return status;
    }
    if (logits == NULL) {
        return EA_ERR_NULL;
    }
    if (logits_len < head->classes) {
        return EA_ERR_BUFFER;
    }
    status = ea_features(head, embedding, dim, scratch, scratch_len);
    if (status != EA_OK) {
        return status;
    }
    in_float = float_sums_safe(head, scratch);
    for (c = 0; c < head->classes; c++) {
        double value = (column_dot(head, scratch, c, in_float) + bias_of(head, c)) / (double)head->temperature;
        if (!(fabs(value) <= (double)FLT_MAX)) {
            return EA_ERR_RANGE;
        }
        logits[c] = (float)value;
    }
    return EA_OK;
}

ea_status ea_softmax(const float *scores, size_t n, float *probabilities) {
    size_t i;
    float top;
    double total = 0.0;
    if (scores == NULL || probabilities == NULL) {
        return EA_ERR_NULL;
    }
    if (n == 0u) {
        return EA_ERR_ARGUMENT;
    }
    for (i = 0; i < n; i++) {
        if (!finite_f32(scores[i])) {
            return EA_ERR_INPUT;
        }
    }
    top = scores[0];
    for (i = 1; i < n; i++) {
        if (scores[i] > top) {
            top = scores[i];
        }
    }
    for (i = 0; i < n; i++) {
        double shifted = (double)scores[i] - (double)top; /* <= 0, finite in double */
        /* below -104, expf underflows to 0: return 0 without raising the underflow flag */
        float value = shifted < -104.0 ? 0.0f : expf((float)shifted);
        probabilities[i] = value;
        total += (double)value; /* >= 1: the top score gives exp(0) = 1 */
    }
    for (i = 0; i < n; i++) {
        probabilities[i] = (float)((double)probabilities[i] / total);
    }
    return EA_OK;
}

ea_status ea_top_k(const float *scores, size_t n, size_t k, uint32_t *indices, float *values) {
    size_t i, j, filled = 0;
    if (scores == NULL || indices == NULL) {
        return EA_ERR_NULL;
    }
    if (k == 0u || k > n || n > (size_t)UINT32_MAX) {
        return EA_ERR_ARGUMENT;
    }
    for (i = 0; i < n; i++) {
        if (!finite_f32(scores[i])) {
            return EA_ERR_INPUT;
        }
    }
    /* insertion into the sorted top-k list: O(n k), stable (earlier index wins ties) */
    for (i = 0; i < n; i++) {
        float score = scores[i];
        if (filled == k && !(score > scores[indices[k - 1u]])) {
            continue;
        }
        j = filled < k ? filled++ : k - 1u;
        while (j > 0u && score > scores[indices[j - 1u]]) {
            indices[j] = indices[j - 1u];
            j--;
        }
        indices[j] = (uint32_t)i;
    }
    if (values) {
        for (i = 0; i < k; i++) {
            values[i] = scores[indices[i]];
        }
    }
    return EA_OK;
}

/* ------------------------------------------------------------------ adding a class */
static int overflows_mul(size_t a, size_t b) { return a != 0u && b > SIZE_MAX / a; }

size_t ea_add_class_workspace_size(const ea_head *head, size_t m) {
    size_t fixed;
    if (head == NULL || head->data == NULL) {
        return 0u;
    }
    /* prototype (D doubles) + features (D floats) + column (D floats) + r (m doubles) + alignment */
    fixed = (size_t)head->dim * (sizeof(double) + 2u * sizeof(float)) + sizeof(double);
    if (overflows_mul(m, sizeof(double)) || m * sizeof(double) > SIZE_MAX - fixed) {
        return 0u;
    }
    return fixed + m * sizeof(double);
}

size_t ea_add_class_size(const ea_head *head, size_t name_len) {
    ea_layout layout;
    if (head == NULL || head->data == NULL || name_len == 0u || name_len > EA_MAX_NAME_BYTES ||
        head->classes >= EA_MAX_CLASSES) {
        return 0u;
    }
    layout_of(head->dim, (uint64_t)head->classes + 1u, head->flags, (uint64_t)head->names_bytes + name_len, &layout);
    return layout.total > (uint64_t)SIZE_MAX ? 0u : (size_t)layout.total;
}

/* in-place heapsort of doubles, ascending (no recursion, no allocation) */
static void sift_down(double *v, size_t start, size_t end) {
    size_t root = start;
    while (2u * root + 1u < end) {
        size_t child = 2u * root + 1u;
        if (child + 1u < end && v[child] < v[child + 1u]) {
            child++;
        }
        if (!(v[root] < v[child])) {
            return;
        }
        {
            double t = v[root];
            v[root] = v[child];
            v[child] = t;
        }
        root = child;
    }
}
static void sort_doubles(double *v, size_t n) {
    size_t i;
    if (n < 2u) {
        return;
    }
    for (i = n / 2u; i-- > 0u;) {
        sift_down(v, i, n);
    }
    for (i = n - 1u; i > 0u; i--) {
        double t = v[0];
        v[0] = v[i];
        v[i] = t;
        sift_down(v, 0u, i);
    }
}

/* Mean L2 norm of the existing columns (16 when there are none). */
static double mean_column_norm(const ea_head *head) {
    size_t D = head->dim, d;
    uint32_t c;
    double total = 0.0;
    if (head->classes == 0u) {
        return 16.0;
    }
    for (c = 0; c < head->classes; c++) {
        double squares = 0.0;
        if (head->flags & EA_FLAG_INT8) {
            const int8_t *q = (const int8_t *)(const void *)(head->data + head->off_weights + (size_t)c * D);
            float scale = ld_f32(head->data + head->off_scales + 4u * (size_t)c);
            for (d = 0; d < D; d++) {
                double w = (double)((float)q[d] * scale); /* the dequantised float32 weight */
                squares += w * w;
            }
        } else {
            const uint8_t *w = head->data + head->off_weights + 4u * (size_t)c * D;
            for (d = 0; d < D; d++) {
                double value = (double)ld_f32(w + 4u * d);
                squares += value * value;
            }
        }
        total += sqrt(squares);
    }
    return total / (double)head->classes;
}

/* The safety distance of a threshold from a margin (Python: prototype_column.gap). */
static double claim_gap(double value) {
    return 1e-3 * (1.0 + fabs(value));
}

/* The floor of the bias: the new class wins at the mean of its own examples (the prototype,
 * rounded to float): bias >= the smallest float above max_c (p.w_c + b_c) - p.w. Python:
 * edgeadapt.device.prototype_column.raise_to_floor. features: D floats of workspace. */
static ea_status raise_to_floor(const ea_head *head, const double *prototype, float *features,
                                const float *column, float *bias) {
    size_t D = head->dim, d;
    double best = 0.0, own = 0.0, floor_value;
    uint32_t c;
    float raised;
    if (head->classes == 0u) {
        return EA_OK;
    }
    for (d = 0; d < D; d++) {
        features[d] = (float)prototype[d];
    }
    for (c = 0; c < head->classes; c++) {
        double logit = bias_of(head, c);
        if (head->flags & EA_FLAG_INT8) {
            const int8_t *q = (const int8_t *)(const void *)(head->data + head->off_weights + (size_t)c * D);
            float scale = ld_f32(head->data + head->off_scales + 4u * (size_t)c);
            for (d = 0; d < D; d++) {
                logit += (double)features[d] * (double)((float)q[d] * scale);
            }
        } else {
            const uint8_t *w = head->data + head->off_weights + 4u * (size_t)c * D;
            for (d = 0; d < D; d++) {
                logit += (double)features[d] * (double)ld_f32(w + 4u * d);
            }
        }
        if (c == 0u || logit > best) {
            best = logit;
        }
    }
    for (d = 0; d < D; d++) {
        own += (double)features[d] * (double)column[d];
    }
    floor_value = best - own;
    if (!(fabs(floor_value) <= (double)FLT_MAX / 2.0)) {
        return EA_ERR_RANGE;
    }
    if ((double)*bias > floor_value) {
        return EA_OK;
    }
    floor_value += claim_gap(floor_value);
    raised = (float)floor_value;
    if ((double)raised < floor_value) {
        raised = nextafterf(raised, FLT_MAX);
    }
    *bias = raised;
    return EA_OK;
}

ea_status ea_prototype_column(const ea_head *head, const float *shots, size_t n, size_t dim,
                              const float *background, size_t m, double claim_budget, void *work,
                              size_t work_size, float *column, size_t column_len, float *bias) {
    size_t D, d, i, needed;
    uintptr_t base;
    double *prototype, *margins, norm = 0.0, scale;
    float *features;
    ea_status status = check_head(head);
    if (status != EA_OK) {
        return status;
    }
    if (shots == NULL || work == NULL || column == NULL || bias == NULL || (m > 0u && background == NULL)) {
        return EA_ERR_NULL;
    }
    D = head->dim;
    if (dim != D) {
        return EA_ERR_DIM;
    }
    if (n == 0u || (m > 0u && head->classes > 0u && !(claim_budget > 0.0 && claim_budget < 1.0))) {
        return EA_ERR_ARGUMENT;
    }
    if (head->classes == 0u) {
        m = 0u; /* nothing to compete with */
    }
    needed = ea_add_class_workspace_size(head, m);
    if (needed == 0u || work_size < needed || column_len < D) {
        return EA_ERR_BUFFER;
    }
    base = ((uintptr_t)work + (sizeof(double) - 1u)) & ~(uintptr_t)(sizeof(double) - 1u);
    prototype = (double *)base;
    features = (float *)(void *)(prototype + D);
    /* workspace: prototype (D doubles) | features (D floats) | column (D floats) | margins (m doubles) */
    margins = (double *)(void *)((uint8_t *)(void *)prototype + D * (sizeof(double) + 2u * sizeof(float)));
    for (d = 0; d < D; d++) {
        prototype[d] = 0.0;
    }
    for (i = 0; i < n; i++) {
        if (overflows_mul(i, D)) {
            return EA_ERR_ARGUMENT;
        }
        status = ea_features(head, shots + i * D, D, features, D);
        if (status != EA_OK) {
            return status;
        }
        for (d = 0; d < D; d++) {
            prototype[d] += (double)features[d];
        }
    }
    for (d = 0; d < D; d++) {
        prototype[d] /= (double)n;
        norm += prototype[d] * prototype[d];
    }
    norm = sqrt(norm);
    if (!(norm > 0.0) || !(norm <= DBL_MAX)) {
        return EA_ERR_DEGENERATE;
    }
    scale = mean_column_norm(head);
    for (d = 0; d < D; d++) {
        double value = scale * (prototype[d] / norm);
        if (!(fabs(value) <= EA_MAX_ABS_WEIGHT)) {
            return EA_ERR_RANGE; /* the format keeps every weight within 2^64 */
        }
        column[d] = (float)value;
    }
    if (m == 0u) {
        double total = 0.0;
        uint32_t c;
        for (c = 0; c < head->classes; c++) {
            total += bias_of(head, c);
        }
        *bias = head->classes ? (float)(total / (double)head->classes) : 0.0f;
        return raise_to_floor(head, prototype, features, column, bias);
    }
    for (i = 0; i < m; i++) {
        double best = 0.0, own = 0.0;
        uint32_t c;
        int in_float;
        if (overflows_mul(i, D)) {
            return EA_ERR_ARGUMENT;
        }
        status = ea_features(head, background + i * D, D, features, D);
        if (status != EA_OK) {
            return status;
        }
        in_float = float_sums_safe(head, features);
        for (c = 0; c < head->classes; c++) {
            double logit = column_dot(head, features, c, in_float) + bias_of(head, c);
            if (c == 0u || logit > best) {
                best = logit;
            }
        }
        for (d = 0; d < D; d++) {
            own += (double)features[d] * (double)column[d];
        }
        margins[i] = best - own;
    }
    sort_doubles(margins, m);
    {
        /* j = m - ceil((1-q) m): the midpoint of r_{j-1} and r_j (ascending), or r_0 - gap when j = 0
         * (Python: prototype_column.claim_threshold) */
        double rank = ceil((1.0 - claim_budget) * (double)m);
        size_t largest = rank < 1.0 ? 1u : (rank > (double)m ? m : (size_t)rank);
        size_t index = m - largest;
        double value;
        if (!(fabs(margins[0]) <= (double)FLT_MAX / 2.0) || !(fabs(margins[index]) <= (double)FLT_MAX / 2.0)) {
            return EA_ERR_RANGE;
        }
        value = index == 0u ? margins[0] - claim_gap(margins[0]) : 0.5 * (margins[index - 1u] + margins[index]);
        /* round down to float: the background example whose margin is the bias stays unclaimed */
        *bias = (float)value;
        if ((double)*bias > value) {
            *bias = nextafterf(*bias, -FLT_MAX);
        }
    }
    return raise_to_floor(head, prototype, features, column, bias);
}

static int regions_overlap(const void *a, size_t a_size, const void *b, size_t b_size) {
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + b_size && y < x + a_size;
}

static void write_checksum(uint8_t *out, size_t total) {
    ea_sha256(out, total - EA_SHA256_SIZE, out + total - EA_SHA256_SIZE);
}

ea_status ea_add_class(const ea_head *head, const float *shots, size_t n, size_t dim,
                       const float *background, size_t m, double claim_budget, const char *name,
                       size_t name_len, void *work, size_t work_size, uint8_t *out, size_t out_size,
                       size_t *written) {
    size_t total, D, C, i, d, column_bytes;
    ea_layout layout;
    float *column, bias = 0.0f;
    uintptr_t base;
    uint32_t c;
    ea_status status = check_head(head);
    if (status != EA_OK) {
        return status;
    }
    if (name == NULL || out == NULL || written == NULL || work == NULL) {
        return EA_ERR_NULL;
    }
    *written = 0u;
    if (name_len == 0u || name_len > EA_MAX_NAME_BYTES || head->classes >= EA_MAX_CLASSES) {
        return EA_ERR_ARGUMENT;
    }
    for (i = 0; i < name_len; i++) {
        if (!name_byte_ok((uint8_t)name[i])) {
            return EA_ERR_ARGUMENT;
        }
    }
    for (c = 0; c < head->classes; c++) {
        size_t length;
        const char *existing = ea_head_class_name(head, c, &length);
        if (length == name_len && memcmp(existing, name, name_len) == 0) {
            return EA_ERR_ARGUMENT; /* the class exists already */
        }
    }
    total = ea_add_class_size(head, name_len);
    if (total == 0u || out_size < total) {
        return EA_ERR_BUFFER;
    }
    if (regions_overlap(out, total, head->data, head->size) || regions_overlap(work, work_size, out, total) ||
        regions_overlap(work, work_size, head->data, head->size)) {
        return EA_ERR_ARGUMENT; /* head, work and out must be three separate buffers */
    }
    /* the column goes to the workspace area after the prototype and features */
    if (work_size < ea_add_class_workspace_size(head, head->classes ? m : 0u)) {
        return EA_ERR_BUFFER;
    }
    D = head->dim;
    C = head->classes;
    base = ((uintptr_t)work + (sizeof(double) - 1u)) & ~(uintptr_t)(sizeof(double) - 1u);
    column = (float *)(void *)((uint8_t *)base + D * (sizeof(double) + sizeof(float)));
    status = ea_prototype_column(head, shots, n, dim, background, m, claim_budget, work, work_size, column, D, &bias);
    if (status != EA_OK) {
        return status;
    }
    layout_of(D, (uint64_t)C + 1u, head->flags, (uint64_t)head->names_bytes + name_len, &layout);
    /* header and mean unchanged except the counts */
    memcpy(out, head->data, head->off_weights);
    st_u32(out + EA_OFF_CLASSES, (uint32_t)(C + 1u));
    st_u32(out + EA_OFF_NAMES_BYTES, (uint32_t)(head->names_bytes + name_len));
    st_u64(out + EA_OFF_TOTAL_SIZE, (uint64_t)total);
    if (head->flags & EA_FLAG_INT8) {
        float top = 0.0f, scale;
        uint8_t *q = out + layout.weights + C * D;
        column_bytes = C * D;
        memcpy(out + layout.weights, head->data + head->off_weights, column_bytes);
        for (d = 0; d < D; d++) {
            float magnitude = fabsf(column[d]);
            if (magnitude > top) {
                top = magnitude;
            }
        }
        scale = top > 0.0f ? top / 127.0f : 1.0f;
        if (!(scale > 0.0f)) {
            scale = FLT_MIN; /* a subnormal column: every weight rounds to 0 anyway */
        }
        for (d = 0; d < D; d++) {
            float value = rintf(column[d] / scale); /* |column / scale| <= 127: no overflow */
            if (value > 127.0f) {
                value = 127.0f;
            } else if (value < -127.0f) {
                value = -127.0f;
            }
            q[d] = (uint8_t)(int8_t)value;
        }
        for (i = (C + 1u) * D; i < layout.scales - layout.weights; i++) {
            out[layout.weights + i] = 0u;
        }
        memcpy(out + layout.scales, head->data + head->off_scales, 4u * C);
        st_f32(out + layout.scales + 4u * C, scale);
    } else {
        column_bytes = 4u * C * D;
        memcpy(out + layout.weights, head->data + head->off_weights, column_bytes);
        for (d = 0; d < D; d++) {
            st_f32(out + layout.weights + column_bytes + 4u * d, column[d]);
        }
    }
    memcpy(out + layout.bias, head->data + head->off_bias, 4u * C);
    st_f32(out + layout.bias + 4u * C, bias);
    memcpy(out + layout.name_offsets, head->data + head->off_name_offsets, 4u * (C + 1u));
    st_u32(out + layout.name_offsets + 4u * (C + 1u), (uint32_t)(head->names_bytes + name_len));
    memcpy(out + layout.names, head->data + head->off_names, head->names_bytes);
    memcpy(out + layout.names + head->names_bytes, name, name_len);
    write_checksum(out, total);
    *written = total;
    return EA_OK;
}

ea_status ea_head_serialize(const ea_head *head, uint8_t *out, size_t out_size, size_t *written) {
    ea_status status = check_head(head);
    if (status != EA_OK) {
        return status;
    }
    if (out == NULL || written == NULL) {
        return EA_ERR_NULL;
    }
    *written = 0u;
    if (out_size < head->size) {
        return EA_ERR_BUFFER;
    }
    if ((const uint8_t *)out != head->data) {
        memmove(out, head->data, head->size - EA_SHA256_SIZE);
    }
    write_checksum(out, head->size);
    *written = head->size;
    return EA_OK;
}
