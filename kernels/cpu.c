/* y = x · Wᵀ on the CPU with W in ggml's own block layout (the GGUF file's bytes), row gathers from it, decode
 * attention over a float cache, and a whole Llama-family decode step built from those.
 *
 * Built at first use by kernels/cpu.py with the user's C compiler (-O3 -march=native, OpenMP when the
 * compiler has it). The float32 path uses GCC / clang vector extensions only, so the same source vectorises
 * for AVX2, AVX-512 and NEON: each block is dequantised into float32 in L1 and multiplied with fp32
 * activations, so the products are the ones the dequantised path computes (the same float32 weights), only
 * summed in another order, and the memory read per weight is the file's (0.5625 bytes for Q4_0 against 4 for a
 * float32 copy). On x86 with AVX2 the integer-activation path (intrinsics, below) does llama.cpp's trick.
 *
 * Block layouts restate ggml's (ggml-common.h, dequantize_row_*): the tests pin every type bit for bit to
 * kilnlm's format registry, which is itself checked against ggml's bytes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__F16C__) || defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

#define MAX_ROWS 8 /* x rows multiplied per pass over a weight row (decode of up to 8 sequences) */
/* From this many columns a one-row float32 pass reads four weight rows against each x load. A float32 x of 4096+
 * values fills half of L1 or more, and re-reading it per weight row from L2 slowed the weight stream: F16 decode
 * of an 8192x8192 matrix ran at 21-25 GB/s on two Zen 4 cores, 33 GB/s four rows a pass. Below it, four
 * interleaved streams were slower than one (65536x1024: 3.4 -> 8.1 ms), so narrow rows keep one. */
#define WIDE_X 4096

static inline float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__aarch64__)
    __fp16 value;
    memcpy(&value, &h, 2);
    return (float)value;
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exponent = 113;
        while (!(mantissa & 0x400)) { mantissa <<= 1; exponent--; }
        bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
    }
    float value;
    memcpy(&value, &bits, 4);
    return value;
#endif
}

static inline uint16_t read_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline float read_fp16(const uint8_t *p) { return fp16_to_fp32(read_u16(p)); }

/* ------------------------------------------------------- 32 weights of a block -> two vectors of float32 */

/* GCC / clang vector extensions: 16 lanes, lowered to one AVX-512 register, two AVX2 or four NEON ones. */
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));
typedef uint16_t v16h __attribute__((vector_size(32)));

static inline v16b load_bytes(const uint8_t *p) { v16b v; memcpy(&v, p, 16); return v; }
static inline v16f load_floats(const float *p) { v16f v; memcpy(&v, p, 64); return v; }
static inline v16f bytes_to_float(v16b v) { return __builtin_convertvector(__builtin_convertvector(v, v16i), v16f); }
static inline v16f splat(float s) { return (v16f){0} + s; }

static inline v16f halves_to_float(const uint8_t *p) { /* 16 fp16 values */
#if defined(__AVX512F__)
    return (v16f)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__F16C__)
    v16f out;
    __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)));
    memcpy(&out, &lo, 32);
    memcpy((char *)&out + 32, &hi, 32);
    return out;
#else
    v16f out;
    for (int i = 0; i < 16; i++) out[i] = read_fp16(p + 2 * i);
    return out;
#endif
}

static inline void group_f32(const uint8_t *b, int g, v16f *w) {
    w[0] = load_floats((const float *)b + 32 * g);
    w[1] = load_floats((const float *)b + 32 * g + 16);
}

static inline void group_f16(const uint8_t *b, int g, v16f *w) {
    w[0] = halves_to_float(b + 64 * g);
    w[1] = halves_to_float(b + 64 * g + 32);
}

static inline void group_bf16(const uint8_t *b, int g, v16f *w) {
    for (int half = 0; half < 2; half++) {
        v16h h;
        memcpy(&h, b + 64 * g + 32 * half, 32);
        v16u bits = __builtin_convertvector(h, v16u) << 16;
        memcpy(&w[half], &bits, 64);
    }
}

static inline void group_q4_0(const uint8_t *b, int g, v16f *w) { /* fp16 d, 16 bytes of nibbles */
    b += 18 * g;
    const v16f d = splat(read_fp16(b));
    const v16b q = load_bytes(b + 2);
    w[0] = (bytes_to_float(q & 15) - 8.0f) * d;
    w[1] = (bytes_to_float(q >> 4) - 8.0f) * d;
}

static inline void group_q4_1(const uint8_t *b, int g, v16f *w) { /* fp16 d, fp16 m, 16 bytes of nibbles */
    b += 20 * g;
    const v16f d = splat(read_fp16(b)), m = splat(read_fp16(b + 2));
    const v16b q = load_bytes(b + 4);
    w[0] = bytes_to_float(q & 15) * d + m;
    w[1] = bytes_to_float(q >> 4) * d + m;
}

/* The fifth bits of Q5_0 / Q5_1: bit j of qh belongs to element j (j < 32), as 0 or 16. */
static inline void fifth_bits(const uint8_t *p, v16b *lo, v16b *hi) {
    uint32_t qh;
    memcpy(&qh, p, 4);
    const v16u lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const v16u bits = (v16u){0} + qh;
    *lo = __builtin_convertvector(((bits >> lane) & 1) << 4, v16b);
    *hi = __builtin_convertvector(((bits >> (lane + 16)) & 1) << 4, v16b);
}

static inline void group_q5_0(const uint8_t *b, int g, v16f *w) { /* fp16 d, 32 high bits, 16 bytes of nibbles */
    b += 22 * g;
    const v16f d = splat(read_fp16(b));
    v16b h0, h1;
    fifth_bits(b + 2, &h0, &h1);
    const v16b q = load_bytes(b + 6);
    w[0] = (bytes_to_float((q & 15) | h0) - 16.0f) * d;
    w[1] = (bytes_to_float((q >> 4) | h1) - 16.0f) * d;
}

static inline void group_q5_1(const uint8_t *b, int g, v16f *w) { /* fp16 d, fp16 m, 32 high bits, nibbles */
    b += 24 * g;
    const v16f d = splat(read_fp16(b)), m = splat(read_fp16(b + 2));
    v16b h0, h1;
    fifth_bits(b + 4, &h0, &h1);
    const v16b q = load_bytes(b + 8);
    w[0] = bytes_to_float((q & 15) | h0) * d + m;
    w[1] = bytes_to_float((q >> 4) | h1) * d + m;
}

static inline void group_q8_0(const uint8_t *b, int g, v16f *w) { /* fp16 d, 32 int8 */
    b += 34 * g;
    const v16f d = splat(read_fp16(b));
    /* int8 -> float as (q + 128) - 128: compilers widen unsigned bytes in one instruction, signed ones lane by lane */
    w[0] = (bytes_to_float(load_bytes(b + 2) ^ 0x80) - 128.0f) * d;
    w[1] = (bytes_to_float(load_bytes(b + 18) ^ 0x80) - 128.0f) * d;
}

/* K-quants: 256 weights per super-block in 8 groups of 32; 6-bit group scales and minimums in 12 bytes. */
static inline void scale_min_k4(int j, const uint8_t *q, float *sc, float *m) {
    if (j < 4) {
        *sc = (float)(q[j] & 63);
        *m = (float)(q[j + 4] & 63);
    } else {
        *sc = (float)((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
        *m = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

static inline void group_q4_k(const uint8_t *b, int g, v16f *w) { /* d, dmin, scales[12], qs[128] */
    float sc, m;
    scale_min_k4(g, b + 4, &sc, &m);
    const v16f d = splat(read_fp16(b) * sc), min = splat(read_fp16(b + 2) * m);
    const uint8_t *q = b + 16 + 32 * (g / 2);
    const int shift = 4 * (g & 1);
    w[0] = d * bytes_to_float((load_bytes(q) >> shift) & 15) - min;
    w[1] = d * bytes_to_float((load_bytes(q + 16) >> shift) & 15) - min;
}

static inline void group_q5_k(const uint8_t *b, int g, v16f *w) { /* d, dmin, scales[12], qh[32], qs[128] */
    float sc, m;
    scale_min_k4(g, b + 4, &sc, &m);
    const v16f d = splat(read_fp16(b) * sc), min = splat(read_fp16(b + 2) * m);
    const uint8_t *qh = b + 16, *ql = b + 48 + 32 * (g / 2);
    const int shift = 4 * (g & 1);
    for (int half = 0; half < 2; half++) {
        const v16b q = ((load_bytes(ql + 16 * half) >> shift) & 15) | (((load_bytes(qh + 16 * half) >> g) & 1) << 4);
        w[half] = d * bytes_to_float(q) - min;
    }
}

static inline void group_q6_k(const uint8_t *b, int g, v16f *w) { /* ql[128], qh[64], int8 scales[16], d */
    const int half = g / 4, quarter = g % 4;
    const float d = read_fp16(b + 208);
    const int8_t *sc = (const int8_t *)(b + 192) + 8 * half + 2 * quarter;
    const uint8_t *ql = b + 64 * half + 32 * (quarter & 1), *qh = b + 128 + 32 * half;
    const int shift = 4 * (quarter >> 1);
    for (int i = 0; i < 2; i++) {
        const v16b q = ((load_bytes(ql + 16 * i) >> shift) & 15) | (((load_bytes(qh + 16 * i) >> (2 * quarter)) & 3) << 4);
        w[i] = splat(d * sc[i]) * (bytes_to_float(q) - 32.0f);
    }
}

/* ------------------------------------------------------------------ per-type row kernels (dequant inlined) */

/* y[m, n] = sum_k x[m, k] * W[n, k] for rows n0 <= n < n1 and all m < M. ELEM(row, k) reads one weight of a float
 * type, whose rows may end in a part of a group (K % 32 != 0: the demo model's 688 columns); block types have none. */
#define DEFINE_TYPE(name, QK, BYTES, ELEM)                                                                          \
    static void matmul_##name(const uint8_t *w, int64_t row_bytes, int64_t K, const float *x, int64_t M,    \
                              float *y, int64_t N, int64_t n0, int64_t n1) {                                \
        const int64_t blocks = K / QK;                                                                      \
        if (M == 1) { /* decode: two accumulator chains, all in registers */                                \
            int64_t n = n0;                                                                                 \
            for (; K >= WIDE_X && n + 4 <= n1; n += 4) { /* four rows a pass share each x load */            \
                const uint8_t *row = w + n * row_bytes;                                                     \
                v16f acc[4][2] = {{{0}}};                                                                   \
                for (int64_t b = 0; b < blocks; b++)                                                        \
                    _Pragma("GCC unroll 8") for (int g = 0; g < QK / 32; g++) {                             \
                        const v16f x0 = load_floats(x + b * QK + 32 * g), x1 = load_floats(x + b * QK + 32 * g + 16); \
                        for (int r = 0; r < 4; r++) {                                                       \
                            v16f wv[2];                                                                     \
                            group_##name(row + r * row_bytes + b * BYTES, g, wv);                           \
                            acc[r][0] += wv[0] * x0;                                                        \
                            acc[r][1] += wv[1] * x1;                                                        \
                        }                                                                                   \
                    }                                                                                       \
                for (int r = 0; r < 4; r++) {                                                               \
                    const v16f both = acc[r][0] + acc[r][1];                                                \
                    float sum = 0.0f;                                                                       \
                    for (int l = 0; l < 16; l++) sum += both[l];                                            \
                    for (int64_t k = blocks * QK; k < K; k++) sum += ELEM(row + r * row_bytes, k) * x[k];   \
                    y[n + r] = sum;                                                                         \
                }                                                                                           \
            }                                                                                               \
            for (; n < n1; n++) {                                                                           \
                const uint8_t *row = w + n * row_bytes;                                                     \
                v16f acc0 = {0}, acc1 = {0};                                                                \
                for (int64_t b = 0; b < blocks; b++)                                                        \
                    _Pragma("GCC unroll 8") for (int g = 0; g < QK / 32; g++) {                                                     \
                        v16f wv[2];                                                                         \
                        group_##name(row + b * BYTES, g, wv);                                               \
                        acc0 += wv[0] * load_floats(x + b * QK + 32 * g);                                   \
                        acc1 += wv[1] * load_floats(x + b * QK + 32 * g + 16);                              \
                    }                                                                                       \
                acc0 += acc1;                                                                               \
                float sum = 0.0f;                                                                           \
                for (int l = 0; l < 16; l++) sum += acc0[l];                                                \
                for (int64_t k = blocks * QK; k < K; k++) sum += ELEM(row, k) * x[k];                       \
                y[n] = sum;                                                                                 \
            }                                                                                               \
            return;                                                                                         \
        }                                                                                                   \
        for (int64_t n = n0; n < n1; n++) {                                                                 \
            const uint8_t *row = w + n * row_bytes;                                                         \
            for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {                                                  \
                const int rows = (int)(M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS);                              \
                v16f acc[MAX_ROWS];                                                                         \
                for (int r = 0; r < rows; r++) acc[r] = (v16f){0};                                          \
                for (int64_t b = 0; b < blocks; b++) {                                                      \
                    _Pragma("GCC unroll 8") for (int g = 0; g < QK / 32; g++) {                                                     \
                        v16f wv[2];                                                                         \
                        group_##name(row + b * BYTES, g, wv);                                               \
                        const float *xg = x + m0 * K + b * QK + 32 * g;                                     \
                        for (int r = 0; r < rows; r++)                                                      \
                            acc[r] += wv[0] * load_floats(xg + r * K) + wv[1] * load_floats(xg + r * K + 16); \
                    }                                                                                       \
                }                                                                                           \
                for (int r = 0; r < rows; r++) {                                                            \
                    float sum = 0.0f;                                                                       \
                    for (int l = 0; l < 16; l++) sum += acc[r][l];                                          \
                    for (int64_t k = blocks * QK; k < K; k++) sum += ELEM(row, k) * x[(m0 + r) * K + k];   \
                    y[(m0 + r) * N + n] = sum;                                                              \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
    static void rows_##name(const uint8_t *w, int64_t row_bytes, int64_t K, const int64_t *index,           \
                            float *out, int64_t r0, int64_t r1) {                                           \
        for (int64_t r = r0; r < r1; r++) {                                                                 \
            const uint8_t *row = w + (index ? index[r] : r) * row_bytes;                                    \
            for (int64_t b = 0; b < K / QK; b++)                                                            \
                _Pragma("GCC unroll 8") for (int g = 0; g < QK / 32; g++) {                                                         \
                    v16f wv[2];                                                                             \
                    group_##name(row + b * BYTES, g, wv);                                                   \
                    memcpy(out + r * K + b * QK + 32 * g, wv, sizeof wv);                                   \
                }                                                                                           \
            for (int64_t k = K / QK * QK; k < K; k++) out[r * K + k] = ELEM(row, k);                        \
        }                                                                                                   \
    }

static inline float elem_f32(const uint8_t *row, int64_t k) { float v; memcpy(&v, row + 4 * k, 4); return v; }
static inline float elem_f16(const uint8_t *row, int64_t k) { return read_fp16(row + 2 * k); }
static inline float elem_bf16(const uint8_t *row, int64_t k) {
    const uint32_t bits = (uint32_t)read_u16(row + 2 * k) << 16;
    float v;
    memcpy(&v, &bits, 4);
    return v;
}
static inline float no_elem(const uint8_t *row, int64_t k) { (void)row; (void)k; return 0.0f; } /* whole blocks */

DEFINE_TYPE(f32, 32, 128, elem_f32)
DEFINE_TYPE(f16, 32, 64, elem_f16)
DEFINE_TYPE(bf16, 32, 64, elem_bf16)
DEFINE_TYPE(q4_0, 32, 18, no_elem)
DEFINE_TYPE(q4_1, 32, 20, no_elem)
DEFINE_TYPE(q5_0, 32, 22, no_elem)
DEFINE_TYPE(q5_1, 32, 24, no_elem)
DEFINE_TYPE(q8_0, 32, 34, no_elem)
DEFINE_TYPE(q4_k, 256, 144, no_elem)
DEFINE_TYPE(q5_k, 256, 176, no_elem)
DEFINE_TYPE(q6_k, 256, 210, no_elem)

/* ------------------------ integer activations (llama.cpp's way, or finer), x86 with AVX2, FMA and F16C only */

/* A decode step's x row is quantised per 32 values with a float scale, to int8 (ggml's Q8_0: d = max|x| / 127,
 * q = round(x / d), as llama.cpp's CPU backend does) or int16 (d = max|x| / 32767), and the weights' codes stay
 * integers with their block scales (and minimums) applied per group, so a group's dot product is a few integer
 * instructions (VNNI vpdpbusd / vpdpwssd, or maddubs / madd) instead of 32 float multiply-adds. Matmul outputs
 * move by about 5e-3 (int8) or 2e-5 (int16) of their largest value; the float32 path above stays for exact
 * products, several x rows and other CPUs. */
typedef struct {
    void *q;       /* K codes: int8 or int16 */
    float *d;      /* K / 32 scales */
    float *sum;    /* K / 32 values d * sum of q (for the minimum of d * q + m formats) */
    int32_t *isum; /* K / 32 sums of q (for formats stored with an offset: Q4_0's q - 8) */
} q_row;

/* x per 32 values as d * q with q = round(x / d) (to nearest even, as ggml's AVX code rounds), d = max|x| / qmax:
 * int8 (qmax 127, ggml's Q8_0) or int16. rintf, unlike roundf, is one instruction, so the loops vectorise: this
 * runs before every matmul of a decode step. */
static inline __attribute__((always_inline)) void quantize_group(const float *v, int bits, void *q, float *d_out,
                                                                 float *sum_out, int32_t *isum_out) {
    const float qmax = bits == 8 ? 127.0f : 32767.0f;
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) { /* a compare, not fmaxf (a libm call for its NaN rules), so it vectorises */
        const float a = __builtin_fabsf(v[j]);
        amax = a > amax ? a : amax;
    }
    const float d = amax / qmax, id = d != 0.0f ? 1.0f / d : 0.0f;
    int32_t qsum = 0; /* the minimum's term uses the quantised values too: the product is then exactly the
                         dequantised weights times the quantised activations (ggml's Q8_1 keeps d * sum q) */
    if (bits == 8) {
        int8_t *out = q;
        for (int j = 0; j < 32; j++) out[j] = (int8_t)__builtin_rintf(v[j] * id);
        for (int j = 0; j < 32; j++) qsum += out[j];
    } else {
        int16_t *out = q;
        for (int j = 0; j < 32; j++) out[j] = (int16_t)__builtin_rintf(v[j] * id);
        for (int j = 0; j < 32; j++) qsum += out[j];
    }
    *d_out = d;
    *sum_out = d * (float)qsum;
    *isum_out = qsum;
}

static void quantize_row(const float *x, int64_t K, int bits, q_row *out) {
    for (int64_t i = 0; i < K / 32; i++) {
        if (bits == 8)
            quantize_group(x + 32 * i, 8, (int8_t *)out->q + 32 * i, out->d + i, out->sum + i, out->isum + i);
        else
            quantize_group(x + 32 * i, 16, (int16_t *)out->q + 32 * i, out->d + i, out->sum + i, out->isum + i);
    }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

/* 8 int32 partial sums of w · x over 32 signed bytes (lanes 0-3 cover bytes 0-15, lanes 4-7 bytes 16-31). */
static inline __m256i dot_s8(__m256i w, __m256i x) {
    const __m256i aw = _mm256_sign_epi8(w, w), sx = _mm256_sign_epi8(x, w); /* |w| * (x * sign w) = w * x */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), aw, sx);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
#endif
}

static inline __m256i nibbles_32(const uint8_t *p) { /* 16 bytes -> low nibbles (elements 0-15), high (16-31) */
    const __m128i raw = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
}

static inline __m256i bits_32(const uint8_t *p) { /* 32 bits -> byte i = 16 if bit i is set, else 0 */
    uint32_t bits;
    memcpy(&bits, p, 4);
    const __m256i shuffle = _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303);
    const __m256i mask = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuffle); /* byte i = byte i/8 */
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask), _mm256_set1_epi8(16));
}

/* 32 codes of a group as unsigned bytes: nibbles plus, for the 5-bit formats, the fifth bit as 16. */
static inline __m256i q5_0_codes(const uint8_t *b) { return _mm256_or_si256(nibbles_32(b + 6), bits_32(b + 2)); }
static inline __m256i q5_1_codes(const uint8_t *b) { return _mm256_or_si256(nibbles_32(b + 8), bits_32(b + 4)); }

static inline __m256i shifted_nibbles(const uint8_t *p, int shift) { /* 32 bytes -> (byte >> shift) & 15 */
    const __m256i raw = _mm256_loadu_si256((const __m256i *)p);
    return _mm256_and_si256(_mm256_srli_epi16(raw, shift), _mm256_set1_epi8(0x0f));
}

static inline __m256i q5_k_codes(const uint8_t *b, int g) { /* group g of a Q5_K block */
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
    const __m256i high = _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, g), 4), _mm256_set1_epi8(16));
    return _mm256_or_si256(shifted_nibbles(b + 48 + 32 * (g / 2), 4 * (g & 1)), high);
}

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Decode (one x row) of the 32-weight formats whose group is an fp16 scale d (and minimum m) and 32 codes, eight
 * groups a pass. Per group only the integer dot product runs (the codes as they sit in the block: Q4_0's unsigned
 * nibbles, its -8 applied once per group through x's code sum); the eight sums are then added across lanes
 * together, and the scales d_w * d_x of the eight groups are one vector multiply. Scaling each group on its own
 * (a scalar fp16 conversion, a broadcast and a float multiply-add per 32 weights) left Q4_0 compute-bound at
 * ~11 GB/s on two Zen 4 cores; this runs 1.2x (int16) to 1.6x (int8) faster. */
static inline __m256i dpwssd(__m256i acc, __m256i w, __m256i x) { /* acc + pairwise int16 products */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, w, x);
#elif defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, w, x);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
#endif
}

static inline __m256i dpbusd(__m256i u, __m256i s) { /* 8 sums of 4 (unsigned byte u) * (signed byte s) */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else /* u <= 31 here (4- and 5-bit codes), so the int16 pair sums of maddubs cannot saturate */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline __m256i load256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

static inline __m256i dot16_words(__m256i lo, __m256i hi, const int16_t *x) { /* elements 0-15 and 16-31 */
    return dpwssd(_mm256_madd_epi16(lo, load256(x)), hi, load256(x + 16));
}

static inline __m256i dot16_q4_0(const uint8_t *b, const int16_t *x) {
    const __m256i raw = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 2))); /* both nibbles a word */
    return dot16_words(_mm256_and_si256(raw, _mm256_set1_epi16(15)), _mm256_srli_epi16(raw, 4), x);
}

static inline __m256i dot8_q4_0(const uint8_t *b, const int8_t *x) { return dpbusd(nibbles_32(b + 2), load256(x)); }

static inline __m256i dot16_q8_0(const uint8_t *b, const int16_t *x) {
    const __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 2)));
    return dot16_words(lo, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 18))), x);
}

static inline __m256i dot8_q8_0(const uint8_t *b, const int8_t *x) { return dot_s8(load256(b + 2), load256(x)); }

static inline __m256i dot16_bytes(__m256i codes, const int16_t *x) { /* 32 unsigned byte codes */
    return dot16_words(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(codes)),
                       _mm256_cvtepu8_epi16(_mm256_extracti128_si256(codes, 1)), x);
}

static inline __m256i dot16_q4_1(const uint8_t *b, const int16_t *x) {
    const __m256i raw = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 4)));
    return dot16_words(_mm256_and_si256(raw, _mm256_set1_epi16(15)), _mm256_srli_epi16(raw, 4), x);
}

static inline __m256i dot8_q4_1(const uint8_t *b, const int8_t *x) { return dpbusd(nibbles_32(b + 4), load256(x)); }
static inline __m256i dot16_q5_0(const uint8_t *b, const int16_t *x) { return dot16_bytes(q5_0_codes(b), x); }
static inline __m256i dot8_q5_0(const uint8_t *b, const int8_t *x) { return dpbusd(q5_0_codes(b), load256(x)); }
static inline __m256i dot16_q5_1(const uint8_t *b, const int16_t *x) { return dot16_bytes(q5_1_codes(b), x); }
static inline __m256i dot8_q5_1(const uint8_t *b, const int8_t *x) { return dpbusd(q5_1_codes(b), load256(x)); }

static inline __m256i lane_sums8(const __m256i p[8]) { /* lane i = the sum of p[i]'s eight lanes */
    const __m256i a = _mm256_hadd_epi32(p[0], p[1]), b = _mm256_hadd_epi32(p[2], p[3]);
    const __m256i c = _mm256_hadd_epi32(p[4], p[5]), d = _mm256_hadd_epi32(p[6], p[7]);
    const __m256i ab = _mm256_hadd_epi32(a, b), cd = _mm256_hadd_epi32(c, d); /* [0-3 low half | 0-3 high half] */
    return _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20), _mm256_permute2x128_si256(ab, cd, 0x31));
}

static inline int32_t lane_sum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

static inline __m256 halves8(__m256i words) { /* the low fp16 of eight 32-bit lanes */
    const __m256i low = _mm256_and_si256(words, _mm256_set1_epi32(0xffff));
    return _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(low, low), 0x08)));
}

static inline __m256 scales8(const uint8_t *b, int bytes) { /* the fp16 d at the start of eight blocks */
#if defined(__AVX512VBMI__) && defined(__AVX512VL__)
    if (7 * bytes + 2 <= 128) { /* the eight d's lie in 128 bytes (Q4_0's): one permutation of two registers */
        const __m512i lo = _mm512_loadu_si512(b), hi = _mm512_loadu_si512(b + 64);
        const __m512i at = _mm512_set_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            7 * bytes + 1, 7 * bytes, 6 * bytes + 1, 6 * bytes, 5 * bytes + 1, 5 * bytes, 4 * bytes + 1, 4 * bytes,
            3 * bytes + 1, 3 * bytes, 2 * bytes + 1, 2 * bytes, bytes + 1, bytes, 1, 0);
        return _mm256_cvtph_ps(_mm512_castsi512_si128(_mm512_permutex2var_epi8(lo, at, hi)));
    }
#endif
    const __m256i at = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bytes));
    return halves8(_mm256_i32gather_epi32((const int *)b, at, 1));
}

static inline void scales_mins8(const uint8_t *b, int bytes, __m256 *d, __m256 *m) { /* fp16 d, m of 8 blocks */
    const __m256i at = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bytes));
    const __m256i words = _mm256_i32gather_epi32((const int *)b, at, 1); /* d | m << 16 */
    *d = halves8(words);
    *m = halves8(_mm256_srli_epi32(words, 16));
}

/* One row of W · x, x one row of codes: weight = d * (code - OFFSET), or d * code + m with HAS_MIN (fp16 d, m at
 * the start of the block). */
#define DEFINE_GEMV(name, BYTES, OFFSET, HAS_MIN)                                                                \
    static inline __attribute__((always_inline)) float gemv_row_##name(const uint8_t *row, int64_t groups,      \
                                                                       const q_row *x, const int bits) {        \
        __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};                                          \
        int64_t g = 0;                                                                                          \
        for (; g + 8 <= groups; g += 8) {                                                                       \
            __m256i p[8];                                                                                       \
            for (int i = 0; i < 8; i++)                                                                         \
                p[i] = bits == 8 ? dot8_##name(row + (g + i) * BYTES, (const int8_t *)x->q + 32 * (g + i))      \
                                 : dot16_##name(row + (g + i) * BYTES, (const int16_t *)x->q + 32 * (g + i));   \
            __m256i sums = lane_sums8(p);                                                                       \
            if (OFFSET) sums = _mm256_sub_epi32(sums, _mm256_mullo_epi32(load256(x->isum + g),                 \
                                                                         _mm256_set1_epi32(OFFSET)));           \
            __m256 d, m;                                                                                        \
            if (HAS_MIN) /* m * sum x, with x's quantised sums (x->sum: d_x * sum of codes) */                  \
                scales_mins8(row + g * BYTES, BYTES, &d, &m);                                                   \
            else                                                                                                \
                d = scales8(row + g * BYTES, BYTES);                                                            \
            const __m256 scale = _mm256_mul_ps(d, _mm256_loadu_ps(x->d + g));                                   \
            acc[(g >> 3) & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[(g >> 3) & 1]);           \
            if (HAS_MIN) acc[1] = _mm256_fmadd_ps(m, _mm256_loadu_ps(x->sum + g), acc[1]);                       \
        }                                                                                                       \
        float sum = hsum_ps(_mm256_add_ps(acc[0], acc[1]));                                                    \
        for (; g < groups; g++) {                                                                               \
            const __m256i p = bits == 8 ? dot8_##name(row + g * BYTES, (const int8_t *)x->q + 32 * g)           \
                                        : dot16_##name(row + g * BYTES, (const int16_t *)x->q + 32 * g);        \
            sum += read_fp16(row + g * BYTES) * x->d[g] * (float)(lane_sum(p) - OFFSET * x->isum[g]);           \
            if (HAS_MIN) sum += read_fp16(row + g * BYTES + 2) * x->sum[g];                                     \
        }                                                                                                       \
        return sum;                                                                                             \
    }

/* Q4_K: a 256-weight block is eight groups of 32 with 6-bit scales and minimums (d * sc * q - dmin * m), so one
 * block is one pass: eight integer dots, one lane reduction, the sixteen 6-bit values unpacked as two vectors. */
static inline __m256i dot16_q4_k(const uint8_t *b, int g, const int16_t *x) {
    const uint8_t *q = b + 16 + 32 * (g / 2);
    const __m256i lo = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)q));
    const __m256i hi = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
    if (g & 1) return dot16_words(_mm256_srli_epi16(lo, 4), _mm256_srli_epi16(hi, 4), x);
    const __m256i low4 = _mm256_set1_epi16(15);
    return dot16_words(_mm256_and_si256(lo, low4), _mm256_and_si256(hi, low4), x);
}

static inline __m256i dot8_q4_k(const uint8_t *b, int g, const int8_t *x) {
    return dpbusd(shifted_nibbles(b + 16 + 32 * (g / 2), 4 * (g & 1)), load256(x));
}

static inline void scales_mins_k4(const uint8_t *q, __m256 *scales, __m256 *mins) { /* scale_min_k4 for j < 8 */
    uint32_t u[3], packed[4];
    memcpy(u, q, 12);
    const uint32_t six = 0x3f3f3f3fu, four = 0x0f0f0f0fu, two = 0x03030303u;
    packed[0] = u[0] & six;                                          /* scales 0-3 */
    packed[1] = (u[2] & four) | (((u[0] >> 6) & two) << 4);          /* scales 4-7 */
    packed[2] = u[1] & six;                                          /* minimums 0-3 */
    packed[3] = ((u[2] >> 4) & four) | (((u[1] >> 6) & two) << 4);   /* minimums 4-7 */
    *scales = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)packed)));
    *mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(packed + 2))));
}

/* Q5_K: Q4_K's layout with a fifth bit per weight (qh) before the nibbles; codes 0-31 as unsigned bytes. */
static inline __m256i dot16_q5_k(const uint8_t *b, int g, const int16_t *x) { return dot16_bytes(q5_k_codes(b, g), x); }
static inline __m256i dot8_q5_k(const uint8_t *b, int g, const int8_t *x) { return dpbusd(q5_k_codes(b, g), load256(x)); }

#define DEFINE_GEMV_K(name, BYTES) /* the K-quants of eight 32-weight groups with 6-bit scales and minimums */  \
    static inline __attribute__((always_inline)) float gemv_row_##name(const uint8_t *row, int64_t groups,      \
                                                                       const q_row *x, const int bits) {        \
        __m256 acc = _mm256_setzero_ps(), corr = _mm256_setzero_ps();                                          \
        for (int64_t g = 0; g < groups; g += 8) {                                                               \
            const uint8_t *b = row + g / 8 * BYTES;                                                             \
            __m256i p[8];                                                                                       \
            for (int i = 0; i < 8; i++)                                                                         \
                p[i] = bits == 8 ? dot8_##name(b, i, (const int8_t *)x->q + 32 * (g + i))                       \
                                 : dot16_##name(b, i, (const int16_t *)x->q + 32 * (g + i));                    \
            __m256 scales, mins;                                                                                \
            scales_mins_k4(b + 4, &scales, &mins);                                                              \
            const __m256 scale = _mm256_mul_ps(_mm256_mul_ps(scales, _mm256_set1_ps(read_fp16(b))),            \
                                               _mm256_loadu_ps(x->d + g));                                      \
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lane_sums8(p)), scale, acc);                               \
            corr = _mm256_fmadd_ps(_mm256_mul_ps(mins, _mm256_set1_ps(read_fp16(b + 2))),                      \
                                   _mm256_loadu_ps(x->sum + g), corr);                                          \
        }                                                                                                       \
        return hsum_ps(_mm256_sub_ps(acc, corr));                                                               \
    }

DEFINE_GEMV_K(q4_k, 144)
DEFINE_GEMV_K(q5_k, 176)

/* Q6_K: sixteen 16-weight sub-blocks with int8 scales, codes q - 32 (int16 here, signed bytes for int8 x). */
static inline __m256i q6_k_codes(const uint8_t *b, int g) { /* 32 signed bytes q - 32 of group g */
    const int half = g / 4, quarter = g % 4;
    const __m256i low = shifted_nibbles(b + 64 * half + 32 * (quarter & 1), 4 * (quarter >> 1));
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * half));
    const __m256i high = _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * quarter), 4),
                                          _mm256_set1_epi8(0x30));
    return _mm256_sub_epi8(_mm256_or_si256(low, high), _mm256_set1_epi8(32));
}

static inline __attribute__((always_inline)) float gemv_row_q6_k(const uint8_t *row, int64_t groups,
                                                                 const q_row *x, const int bits) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g += 8) {
        const uint8_t *b = row + g / 8 * 210;
        const __m128i sc = _mm_loadu_si128((const __m128i *)(b + 192)); /* 16 int8 scales, sub-blocks in order */
        const __m256 d = _mm256_set1_ps(read_fp16(b + 208));
        const __m256 dx = _mm256_loadu_ps(x->d + g);                    /* one per group: two sub-blocks each */
        if (bits == 8) {  /* dpbusd lanes 0-3 sum bytes 0-15 (sub-block 2i), lanes 4-7 bytes 16-31 (2i + 1) */
            __m256i p[8];
            for (int i = 0; i < 8; i++)
                p[i] = dot_s8(q6_k_codes(b, i), load256((const int8_t *)x->q + 32 * (g + i)));
            for (int h = 0; h < 2; h++) {  /* groups 4h..4h+3: [even sub-blocks | odd sub-blocks] */
                const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4 * h], p[4 * h + 1]),
                                                    _mm256_hadd_epi32(p[4 * h + 2], p[4 * h + 3]));
                const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
                const __m256 scale = _mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(
                    _mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8 * h)), order));
                const __m256 dxs = _mm256_permutevar8x32_ps(dx, _mm256_setr_epi32(4 * h, 4 * h + 1, 4 * h + 2, 4 * h + 3,
                                                                                  4 * h, 4 * h + 1, 4 * h + 2, 4 * h + 3));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(_mm256_mul_ps(scale, d), dxs), acc);
            }
            continue;
        }
        __m256i p[16];  /* one per sub-block: its 16 int16 products summed in pairs */
        for (int i = 0; i < 8; i++) {
            const __m256i q = q6_k_codes(b, i);
            const int16_t *xq = (const int16_t *)x->q + 32 * (g + i);
            p[2 * i] = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)), load256(xq));
            p[2 * i + 1] = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1)), load256(xq + 16));
        }
        for (int h = 0; h < 2; h++) {  /* sub-blocks 8h..8h+7: groups 4h..4h+3 */
            const __m256 scale = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8 * h)));
            const __m256 dxs = _mm256_permutevar8x32_ps(dx, _mm256_setr_epi32(4 * h, 4 * h, 4 * h + 1, 4 * h + 1,
                                                                              4 * h + 2, 4 * h + 2, 4 * h + 3, 4 * h + 3));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lane_sums8(p + 8 * h)), _mm256_mul_ps(_mm256_mul_ps(scale, d), dxs),
                                  acc);
        }
    }
    return hsum_ps(acc);
}

/* y[n] for rows n0 <= n < n1, the int8 and int16 cases compiled apart (the row functions are inlined). */
#define DEFINE_GEMV_ROWS(name)                                                                                   \
    static void gemv_##name(const uint8_t *w, int64_t row_bytes, int64_t K, const q_row *x, int bits,          \
                            float *y, int64_t n0, int64_t n1) {                                                 \
        for (int64_t n = n0; n < n1; n++)                                                                       \
            y[n] = bits == 8 ? gemv_row_##name(w + n * row_bytes, K / 32, x, 8)                                 \
                             : gemv_row_##name(w + n * row_bytes, K / 32, x, 16);                               \
    }

DEFINE_GEMV(q4_0, 18, 8, 0)
DEFINE_GEMV(q4_1, 20, 0, 1)
DEFINE_GEMV(q5_0, 22, 16, 0)
DEFINE_GEMV(q5_1, 24, 0, 1)
DEFINE_GEMV(q8_0, 34, 0, 0)
DEFINE_GEMV_ROWS(q4_0)
DEFINE_GEMV_ROWS(q4_1)
DEFINE_GEMV_ROWS(q5_0)
DEFINE_GEMV_ROWS(q5_1)
DEFINE_GEMV_ROWS(q8_0)
DEFINE_GEMV_ROWS(q4_k)
DEFINE_GEMV_ROWS(q5_k)
DEFINE_GEMV_ROWS(q6_k)
#define GEMV(name) gemv_##name
#else
#define GEMV(name) 0
#endif

typedef void (*int_gemv_fn)(const uint8_t *, int64_t, int64_t, const q_row *, int, float *, int64_t, int64_t);

typedef void (*matmul_fn)(const uint8_t *, int64_t, int64_t, const float *, int64_t, float *, int64_t, int64_t,
                          int64_t);
typedef void (*rows_fn)(const uint8_t *, int64_t, int64_t, const int64_t *, float *, int64_t, int64_t);

typedef struct {
    int type, block, bytes;
    matmul_fn matmul;
    rows_fn rows;
    int_gemv_fn gemv_int; /* one x row with int8 / int16 activations; 0 where the format or the CPU has none */
} kernel_t;

static const kernel_t KERNELS[] = {
    {F32, 32, 128, matmul_f32, rows_f32, 0},
    {F16, 32, 64, matmul_f16, rows_f16, 0},
    {BF16, 32, 64, matmul_bf16, rows_bf16, 0},
    {Q4_0, 32, 18, matmul_q4_0, rows_q4_0, GEMV(q4_0)},
    {Q4_1, 32, 20, matmul_q4_1, rows_q4_1, GEMV(q4_1)},
    {Q5_0, 32, 22, matmul_q5_0, rows_q5_0, GEMV(q5_0)},
    {Q5_1, 32, 24, matmul_q5_1, rows_q5_1, GEMV(q5_1)},
    {Q8_0, 32, 34, matmul_q8_0, rows_q8_0, GEMV(q8_0)},
    {Q4_K, 256, 144, matmul_q4_k, rows_q4_k, GEMV(q4_k)},
    {Q5_K, 256, 176, matmul_q5_k, rows_q5_k, GEMV(q5_k)},
    {Q6_K, 256, 210, matmul_q6_k, rows_q6_k, GEMV(q6_k)},
};

static int is_float(int type) { return type == F32 || type == F16 || type == BF16; } /* rows of any length */

static const kernel_t *find(int type) {
    for (size_t i = 0; i < sizeof KERNELS / sizeof KERNELS[0]; i++)
        if (KERNELS[i].type == type) return &KERNELS[i];
    return 0;
}

/* ------------------------------------------------------------------------------------------ public API */

/* Weights per block of a ggml type this library multiplies through, and 0 for any other type. */
int kiln_block_size(int type) {
    const kernel_t *k = find(type);
    return k ? k->block : 0;
}

/* Bytes per block of a supported type (0 otherwise). */
int kiln_block_bytes(int type) {
    const kernel_t *k = find(type);
    return k ? k->bytes : 0;
}

/* Whether the library was built with OpenMP (1) or runs every call on the calling thread (0). */
int kiln_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Split [0, total) into `parts` contiguous chunks, each a multiple of `align` (but the last); chunk `i`. */
static void chunk(int64_t total, int parts, int i, int64_t align, int64_t *lo, int64_t *hi) {
    int64_t units = (total + align - 1) / align;
    *lo = units * i / parts * align;
    *hi = units * (i + 1) / parts * align;
    if (*hi > total) *hi = total;
    if (*lo > total) *lo = total;
}

/* Whether ggml `type` has the integer-activation kernels on this build (x86 with AVX2 and FMA). */
int kiln_has_integer_path(int type) {
    const kernel_t *k = find(type);
    return k && k->gemv_int;
}

/* y (M, N) = x (M, K) · W (N, K)ᵀ, W rows of `row_bytes` ggml blocks. One x row (a decode step) with
 * `activation_bits` 8 or 16 and a format that has the integer kernel is first quantised per 32 values to int8
 * (ggml's Q8_0, as llama.cpp's CPU backend does) or int16; otherwise the products are float32. Several x rows
 * always take float32 products: each dequantised group then serves up to MAX_ROWS rows from registers, which
 * measured as fast as the per-group integer kernels this replaced (8192x2048 on 2 threads, 8 rows: Q4_0 3.9 ms
 * against 4.0, Q4_K 4.2 against 7.3) and is exact. -1 for an unsupported type or K, -2 when scratch memory ran
 * out, else 0. */
int kiln_matmul(int type, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const float *x, int64_t M,
                float *y, int threads, int activation_bits) {
    const kernel_t *k = find(type);
    if (!k || (K % k->block && !is_float(type))) return -1;
    if (threads < 1) threads = 1;
    if (N < 64 * threads) threads = 1; /* a thread team costs more than tiny matrices */
    q_row xq = {0, 0, 0, 0};
    const int bits = (activation_bits == 8 || activation_bits == 16) && k->gemv_int && M == 1 ? activation_bits : 32;
    if (bits != 32) {
        char *scratch = malloc((size_t)K * (bits / 8) + 3 * sizeof(float) * (size_t)(K / 32));
        if (!scratch) return -2;
        xq.d = (float *)scratch;
        xq.sum = xq.d + K / 32;
        xq.isum = (int32_t *)(xq.sum + K / 32);
        xq.q = xq.isum + K / 32;
        quantize_row(x, K, bits, &xq);
    }
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (int t = 0; t < threads; t++) {
        int64_t lo, hi;
        chunk(N, threads, t, 16, &lo, &hi);
        if (lo >= hi) continue;
        if (bits != 32)
            k->gemv_int(w, row_bytes, K, &xq, bits, y, lo, hi);
        else
            k->matmul(w, row_bytes, K, x, M, y, N, lo, hi);
    }
    free(xq.d);
    return 0;
}

/* out (R, K) float32 = rows index[0..R) of W (rows 0..R-1 when index is NULL); -1 for an unsupported type. */
int kiln_dequant_rows(int type, const uint8_t *w, int64_t row_bytes, int64_t K, const int64_t *index, int64_t R,
                      float *out, int threads) {
    const kernel_t *k = find(type);
    if (!k || (K % k->block && !is_float(type))) return -1;
    if (threads < 1) threads = 1;
    if (R < 4 * threads) threads = 1;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (int t = 0; t < threads; t++) {
        int64_t lo, hi;
        chunk(R, threads, t, 1, &lo, &hi);
        if (lo < hi) k->rows(w, row_bytes, K, index, out, lo, hi);
    }
    return 0;
}

/* --------------------------------------------------------------------------------------- decode attention */

/* 16 consecutive elements of a float32, float16 or bfloat16 row, as float32 (`type` is a constant where inlined) */
static inline __attribute__((always_inline)) v16f load_row16(const uint8_t *row, int type, int64_t i) {
    if (type == F16) return halves_to_float(row + 2 * i);
    if (type == BF16) {
        v16h h;
        memcpy(&h, row + 2 * i, 32);
        v16u bits = __builtin_convertvector(h, v16u) << 16;
        v16f out;
        memcpy(&out, &bits, 64);
        return out;
    }
    return load_floats((const float *)row + i);
}

static inline float hsum16(v16f v) {
    float sum = 0.0f;
    for (int l = 0; l < 16; l++) sum += v[l];
    return sum;
}

/* exp(x) for x <= 0 (softmax's shifted scores), 16 at a time: 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2],
 * with the degree-6 Taylor polynomial of e^r (relative error below 3e-7, under float32 softmax's own rounding). */
static inline v16f exp_neg(v16f x) {
    const v16i low = x < -87.0f; /* lanes of -1 where e^x underflows float32 (and padding's -inf): clamp them */
    v16i xb;
    memcpy(&xb, &x, 64);
    const v16f floor_ = (v16f){0} - 87.0f;
    v16i fb;
    memcpy(&fb, &floor_, 64);
    xb = (xb & ~low) | (fb & low);
    memcpy(&x, &xb, 64);
    const v16f n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f + (v16f){0} - 0.5f, v16i), v16f);
    const v16f r = x - n * 0.693145752f - n * 1.42860677e-6f;
    v16f p = (v16f){0} + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
    v16f scale;
    memcpy(&scale, &bits, 64);
    return p * scale;
}

#define MAX_GROUP 16 /* query heads per kv head handled together (GQA); larger groups are split */

/* One (sequence, kv head, group of query heads) task of kiln_decode_attention, for keys and values stored as
 * `type` (inlined per type, so the loads are the type's own). */
static inline __attribute__((always_inline)) void attend_group(const float *q, const uint8_t *kh, const uint8_t *vh,
                                                               float *out, int type, int64_t heads, int64_t keys,
                                                               int64_t padded, int64_t D, int64_t row_bytes,
                                                               float *scores) {
    const float scale = 1.0f / __builtin_sqrtf((float)D);
    for (int64_t s = 0; s < keys; s++) {
        const uint8_t *key = kh + s * row_bytes;
        for (int64_t g = 0; g < heads; g++) {
            v16f acc = {0};
            for (int64_t d = 0; d < D; d += 16) acc += load_floats(q + g * D + d) * load_row16(key, type, d);
            scores[g * padded + s] = hsum16(acc) * scale;
        }
    }
    float inv_total[MAX_GROUP];
    for (int64_t g = 0; g < heads; g++) {
        float *row = scores + g * padded, top = -__builtin_inff();
        for (int64_t s = 0; s < keys; s++) top = row[s] > top ? row[s] : top;
        for (int64_t s = keys; s < padded; s++) row[s] = -__builtin_inff();
        v16f sum = {0};
        for (int64_t s = 0; s < padded; s += 16) {
            const v16f e = exp_neg(load_floats(row + s) - top);
            memcpy(row + s, &e, 64);
            sum += e;
        }
        inv_total[g] = 1.0f / hsum16(sum);
    }
    for (int64_t g = 0; g < heads; g++) {
        v16f acc[16] = {{0}};
        const float *row = scores + g * padded;
        for (int64_t s = 0; s < keys; s++) {
            const v16f p = splat(row[s]);
            for (int64_t d = 0; d < D / 16; d++) acc[d] += p * load_row16(vh + s * row_bytes, type, 16 * d);
        }
        for (int64_t d = 0; d < D / 16; d++) {
            const v16f o = acc[d] * inv_total[g];
            memcpy(out + g * D + 16 * d, &o, 64);
        }
    }
}

/* One query per (sequence, head): out = softmax(q · kᵀ / sqrt(D)) · v over keys first..S-1 (first = S - window,
 * or 0). q, out: (B, Hq, D) float32 contiguous; k, v: (B, Hkv, ., D) of `type` (F32, F16 or BF16: a cache's own
 * element type, read as stored) with contiguous rows and the given batch / head strides in elements (a cache's
 * preallocated buffers); query head h reads kv head h / (Hq / Hkv), and the query heads of one kv head go
 * together so each key and value row is read once. -2 when scratch memory ran out, -1 for a bad shape or type. */
int kiln_decode_attention(const float *q, const void *k, const void *v, float *out, int type, int64_t B, int64_t Hq,
                          int64_t Hkv, int64_t S, int64_t D, int64_t kv_batch_stride, int64_t kv_head_stride,
                          int64_t window, int threads) {
    const int64_t first = window > 0 && window < S ? S - window : 0, keys = S - first, group = Hq / Hkv;
    const int64_t elem = type == F32 ? 4 : 2;
    if (D % 16 || D > 256 || Hq % Hkv || !(type == F32 || type == F16 || type == BF16)) return -1;
    const int64_t parts = (group + MAX_GROUP - 1) / MAX_GROUP, tasks = B * Hkv * parts;
    const int64_t padded = (keys + 15) / 16 * 16;
    int failed = 0;
    if (threads < 1) threads = 1;
    if (B * Hq * keys * D < (1 << 15)) threads = 1;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t b = task / (Hkv * parts), kvh = task / parts % Hkv, g0 = task % parts * MAX_GROUP;
        const int64_t heads = group - g0 < MAX_GROUP ? group - g0 : MAX_GROUP, h0 = kvh * group + g0;
        const int64_t offset = (b * kv_batch_stride + kvh * kv_head_stride + first * D) * elem;
        const uint8_t *kh = (const uint8_t *)k + offset, *vh = (const uint8_t *)v + offset;
        const float *qh = q + (b * Hq + h0) * D;
        float *oh = out + (b * Hq + h0) * D;
        float *scores = malloc(sizeof(float) * (size_t)(heads * padded + 1));
        if (!scores) { failed = 1; continue; }
        if (type == F16) attend_group(qh, kh, vh, oh, F16, heads, keys, padded, D, D * elem, scores);
        else if (type == BF16) attend_group(qh, kh, vh, oh, BF16, heads, keys, padded, D, D * elem, scores);
        else attend_group(qh, kh, vh, oh, F32, heads, keys, padded, D, D * elem, scores);
        free(scores);
    }
    return failed ? -2 : 0;
}

/* ------------------------------------------------------------------------------ RMSNorm and RoPE (float32) */

/* out = w * (x * 1/sqrt(mean(x²) + eps)) per row of `dim`, HF Llama's order of operations in float32. */
int kiln_rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t dim, float eps, int threads) {
    if (rows * dim < (1 << 16)) threads = 1;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        v16f acc = {0};
        int64_t i = 0;
        for (; i + 16 <= dim; i += 16) {
            const v16f v = load_floats(xr + i);
            acc += v * v;
        }
        float sum = hsum16(acc);
        for (; i < dim; i++) sum += xr[i] * xr[i];
        const float inv = 1.0f / __builtin_sqrtf(sum / (float)dim + eps);
        for (i = 0; i < dim; i++) o[i] = w[i] * (xr[i] * inv);
    }
    return 0;
}

/* out (B, H, T, D) contiguous = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2]), for x with
 * strides (sb, sh, st) and unit stride along D; cos / sin: T rows of D per sequence, table_batch_stride apart
 * (0 when every sequence has the same positions). */
int kiln_rotary(const float *x, int64_t B, int64_t H, int64_t T, int64_t D, int64_t sb, int64_t sh, int64_t st,
                const float *cos, const float *sin, int64_t table_batch_stride, float *out) {
    if (D % 2) return -1;
    const int64_t half = D / 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++) {
                const float *xr = x + b * sb + h * sh + t * st;
                const float *c = cos + b * table_batch_stride + t * D, *s = sin + b * table_batch_stride + t * D;
                float *o = out + ((b * H + h) * T + t) * D;
                for (int64_t i = 0; i < half; i++) {
                    const float lo = xr[i] * c[i], rot_lo = -xr[i + half] * s[i];
                    const float hi = xr[i + half] * c[i + half], rot_hi = xr[i] * s[i + half];
                    o[i] = lo + rot_lo;
                    o[i + half] = hi + rot_hi;
                }
            }
    return 0;
}

/* ------------------------------------------------------------------ a Llama-family decode step, layer by layer */

/* float32 -> float16 with round-to-nearest-even, as torch's .to(torch.float16) */
static inline uint16_t fp32_to_fp16(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, 0);
#elif defined(__aarch64__)
    __fp16 h = (__fp16)f;
    uint16_t bits;
    memcpy(&bits, &h, 2);
    return bits;
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000, absx = x & 0x7fffffff;
    if (absx >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000 ? 0x200 : 0)); /* inf, nan */
    if (absx >= 0x477ff000) return (uint16_t)(sign | 0x7c00);                                   /* overflow */
    if (absx < 0x38800000) { /* subnormal or zero: add 0.5 (float), whose rounding is the half's */
        float a;
        memcpy(&a, &absx, 4);
        a += 0.5f;
        uint32_t bits;
        memcpy(&bits, &a, 4);
        return (uint16_t)(sign | (bits - 0x3f000000));
    }
    const uint32_t odd = (absx >> 13) & 1;
    return (uint16_t)(sign | ((absx + 0xc8000fff + odd) >> 13));
#endif
}

/* float32 -> bfloat16 with round-to-nearest-even (NaN kept quiet), as torch's .to(torch.bfloat16) */
static inline uint16_t fp32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

static void store_row(void *dst, int type, const float *src, int64_t n) {
    if (type == F16)
        for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = fp32_to_fp16(src[i]);
    else if (type == BF16)
        for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = fp32_to_bf16(src[i]);
    else
        memcpy(dst, src, sizeof(float) * (size_t)n);
}

/* exp(x) for any float32 x (clamped to [-87, 88], where float32 stays normal and finite) */
static inline v16f exp_any(v16f x) {
    const v16i high = x > 88.0f; /* lanes of -1 to clamp */
    const v16f ceiling = splat(88.0f);
    v16i xb, cb;
    memcpy(&xb, &x, 64);
    memcpy(&cb, &ceiling, 64);
    xb = (xb & ~high) | (cb & high);
    memcpy(&x, &xb, 64);
    return exp_neg(x); /* exp_neg's polynomial and scaling hold up to 88 too; it only clamps the low end */
}

typedef struct { /* one weight matrix in ggml blocks, with an optional float32 bias */
    int64_t type;
    const uint8_t *data;
    int64_t row_bytes, rows, cols;
    const float *bias;
} kiln_matrix;

#define MAX_PARTS 4

typedef struct { /* one pre-norm attention + SwiGLU block and its slice of the KV cache */
    const float *attn_norm, *mlp_norm;
    kiln_matrix qkv[MAX_PARTS]; /* outputs concatenated: q (heads * D), k, v (kv_heads * D each) */
    int64_t qkv_parts;
    kiln_matrix o;
    kiln_matrix gate_up[MAX_PARTS]; /* outputs concatenated: gate, up (intermediate each) */
    int64_t gate_up_parts;
    kiln_matrix down;
    void *keys, *values; /* (kv_heads, capacity, D) of cache_type */
    int64_t window;      /* 0: every position */
} kiln_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, capacity, cache_type;
    float eps;
    int32_t threads, activation_bits;
} kiln_dims;

static int matmul_parts(const kiln_matrix *parts, int64_t count, const float *x, float *y, const kiln_dims *m) {
    for (int64_t p = 0; p < count; p++) {
        const kiln_matrix *w = parts + p;
        int rc = kiln_matmul((int)w->type, w->data, w->row_bytes, w->rows, w->cols, x, 1, y, m->threads,
                             m->activation_bits);
        if (rc) return rc;
        if (w->bias)
            for (int64_t i = 0; i < w->rows; i++) y[i] += w->bias[i];
        y += w->rows;
    }
    return 0;
}

/* x (hidden,) float32, the residual stream of one sequence at `position`, through `count` blocks in place:
 * x += attention(rms_norm(x)); x += down(silu(gate) * up)(rms_norm(x)), RoPE by cos / sin (head_dim each,
 * this position's), keys and values stored at `position` of each layer's cache. The same steps and float32
 * products as runtime/models/llama.py's DecoderLayer with the CPU kernels, in one call instead of ~40 torch ops
 * per layer. -2 when memory ran out, -1 for a shape or type the kernels do not take. */
int kiln_decode_layers(const kiln_dims *m, const kiln_layer *layers, int64_t count, float *x, int64_t position,
                       const float *cos, const float *sin) {
    const int64_t H = m->hidden, D = m->head_dim, Hq = m->heads, Hkv = m->kv_heads, I = m->intermediate;
    const int64_t qkv_width = (Hq + 2 * Hkv) * D, elem = m->cache_type == F32 ? 4 : 2;
    if (position >= m->capacity || D % 2) return -1;
    const int64_t floats = H + qkv_width + Hq * D + 2 * I + H;
    float *scratch = malloc(sizeof(float) * (size_t)floats);
    if (!scratch) return -2;
    float *normed = scratch, *qkv = normed + H, *attended = qkv + qkv_width, *gate_up = attended + Hq * D;
    float *delta = gate_up + 2 * I;
    int rc = 0;
    for (int64_t l = 0; l < count && !rc; l++) {
        const kiln_layer *layer = layers + l;
        kiln_rms_norm(x, layer->attn_norm, normed, 1, H, m->eps, 1);
        if ((rc = matmul_parts(layer->qkv, layer->qkv_parts, normed, qkv, m))) break;
        float *q = qkv, *k = qkv + Hq * D, *v = k + Hkv * D;
        kiln_rotary(q, 1, Hq, 1, D, Hq * D, D, D, cos, sin, 0, attended); /* rotated q, for now in `attended` */
        memcpy(q, attended, sizeof(float) * (size_t)(Hq * D));
        kiln_rotary(k, 1, Hkv, 1, D, Hkv * D, D, D, cos, sin, 0, attended);
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t slot = (h * m->capacity + position) * D * elem;
            store_row((uint8_t *)layer->keys + slot, (int)m->cache_type, attended + h * D, D);
            store_row((uint8_t *)layer->values + slot, (int)m->cache_type, v + h * D, D);
        }
        rc = kiln_decode_attention(q, layer->keys, layer->values, attended, (int)m->cache_type, 1, Hq, Hkv,
                                   position + 1, D, Hkv * m->capacity * D, m->capacity * D, layer->window, m->threads);
        if (rc || (rc = matmul_parts(&layer->o, 1, attended, delta, m))) break;
        for (int64_t i = 0; i < H; i++) x[i] += delta[i];
        kiln_rms_norm(x, layer->mlp_norm, normed, 1, H, m->eps, 1);
        if ((rc = matmul_parts(layer->gate_up, layer->gate_up_parts, normed, gate_up, m))) break;
        int64_t i = 0;
        for (; i + 16 <= I; i += 16) { /* silu(gate) * up = gate / (1 + e^-gate) * up */
            const v16f g = load_floats(gate_up + i), u = load_floats(gate_up + I + i);
            const v16f out = g / (1.0f + exp_any(-g)) * u;
            memcpy(gate_up + i, &out, 64);
        }
        for (; i < I; i++) gate_up[i] = gate_up[i] / (1.0f + __builtin_expf(-gate_up[i])) * gate_up[I + i];
        if ((rc = matmul_parts(&layer->down, 1, gate_up, delta, m))) break;
        for (int64_t j = 0; j < H; j++) x[j] += delta[j];
    }
    free(scratch);
    return rc;
}
