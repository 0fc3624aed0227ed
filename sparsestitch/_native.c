/* sparsestitch._native: the stitcher's per-position loops in C, bit-identical to numpy.
 *
 * Optional: setup.py builds it where a C compiler is present and sparsestitch/native.py
 * falls back to the numpy code where it is not (or with SPARSESTITCH_NATIVE=0).  Every
 * function here has a numpy twin that tests compare it with, bit for bit.
 *
 * Exactness rests on doing the same IEEE operations in the same order as numpy:
 *  - built with -ffp-contract=off (no fused multiply-add) and without -ffast-math;
 *  - float arithmetic in float (FLT_EVAL_METHOD 0 on x86-64 SSE and on aarch64);
 *  - roundings written out bit by bit (bfloat16 and float16 round to nearest even).
 *
 * The loops run with the GIL released, so the stitcher's reader threads decode in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
/* x87 arithmetic keeps extra precision and would round twice: setup.py's build fails here
 * and sparsestitch runs its numpy code instead. */
#error "the C loops need float arithmetic evaluated in its own type (FLT_EVAL_METHOD 0)"
#endif

/* AVX2 doubles the vector width where the machine has it (chosen when the module loads; the
 * same IEEE operations, no contraction: -ffp-contract=off, so the bits do not change). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* ---- conversions between a dtype's bits and its wide compute type ---------------- */

static inline float bf16_wide(uint16_t bits)
{
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_round(float value)
{
    uint32_t u;
    memcpy(&u, &value, 4);
    return (uint16_t)((u + (0x7FFFu + ((u >> 16) & 1u))) >> 16);
}

static inline float f16_wide(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu, u;
    if (exponent == 0x1F) {
        u = sign | 0x7F800000u | (mantissa << 13);  /* inf, or a NaN (made canonical later) */
    } else if (exponent != 0) {
        u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        u = sign;
    } else {  /* subnormal: shift the leading one up to the implicit bit */
        uint32_t shifts = 0;
        while (!(mantissa & 0x400u)) {
            mantissa <<= 1;
            shifts++;
        }
        u = sign | ((113u - shifts) << 23) | ((mantissa & 0x3FFu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f16_round(float value)
{
    uint32_t u;
    memcpy(&u, &value, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u)  /* NaN: the caller writes the canonical NaN */
        return sign | 0x7E00u;
    if (a >= 0x477FF000u)  /* 65520 and up (ties to even) round to infinity */
        return sign | 0x7C00u;
    if (a >= 0x38800000u) {  /* normal float16: drop 13 mantissa bits, nearest even */
        a += 0xFFFu + ((a >> 13) & 1u);
        return sign | (uint16_t)((a - 0x38000000u) >> 13);
    }
    uint32_t exponent = a >> 23;
    if (exponent < 102)  /* below 2^-25: rounds to zero */
        return sign;
    /* subnormal float16: the value in units of 2^-24, nearest even */
    uint32_t mantissa = (a & 0x7FFFFFu) | 0x800000u, shift = 126 - exponent;
    uint32_t result = mantissa >> shift, rest = mantissa & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (rest > half || (rest == half && (result & 1u)))
        result++;
    return sign | (uint16_t)result;
}

/* float32 and float64 compute in their own type: their "wide" conversion and rounding are
 * bit casts. */
#define DEFINE_BIT_CAST(NAME, FROM, TO)                                                      \
    static inline TO NAME(FROM value)                                                       \
    {                                                                                       \
        TO out;                                                                             \
        memcpy(&out, &value, sizeof out);                                                   \
        return out;                                                                         \
    }

DEFINE_BIT_CAST(f32_wide, uint32_t, float)
DEFINE_BIT_CAST(f32_round, float, uint32_t)
DEFINE_BIT_CAST(f64_wide, uint64_t, double)
DEFINE_BIT_CAST(f64_round, double, uint64_t)

/* ---- the block merge ------------------------------------------------------------ */

/* One delta's record of the tensor, as BlockMerge holds it: sorted positions, or (dense)
 * every element from `first` on, with positions.obj NULL. */
typedef struct {
    Py_buffer positions, finetuned, base;   /* positions: a bitmap's bytes where `bitmap` */
    double weight;
    Py_ssize_t count, cursor;
    int dense, bitmap;
    int64_t first;
    uint64_t bit;   /* a bitmap record: the bit of element `first` in its bytes */
} Record;

enum { KIND_BF16, KIND_F16, KIND_F32, KIND_F64 };
static const int KIND_ITEMSIZE[] = {2, 2, 4, 8};

/* Merge into block[0:size] (flat elements first, first + 1, ...), window by window: in
 * each window, every record's weighted task vector is added into total[] in record order,
 * with count[] counting the records at each element; then every counted element becomes
 * round(wide(block) + total / count) (mean) or round(wide(block) + scale * total).  With
 * `lone_exact` (the mean of Localize-and-Stitch), an element only one record covers, with
 * weight 1, takes that record's fine-tuned bits exactly (lone[] holds the bits of each
 * element's first record, unit[] a byte for "its weight is 1").  This is
 * BlockMerge._merge_window in combine.py, operation for operation.  A bit per element marks
 * the ones a window touches, so the finishing pass visits those only, in increasing order,
 * and resets total[] and count[] where it was (they are zeroed once per call).  Marks beat a
 * list of touched elements by 1.5x: the finishing pass then walks memory in order.  A bitmap
 * record is walked 64 marks at a time (its set bits by count-trailing-zeros, no branch per
 * element); a run of consecutive elements -- a dense record, a bitmap word of 64 marks --
 * and a finishing word whose 64 elements are all touched go through loops the compiler
 * vectorizes (MERGE_RUN, FINISH_RUN: the same operations per element, in the same order).
 * Returns the index of a record whose positions are not increasing, or -1. */
#define ACCUMULATE_VALUE(WIDE, TO_WIDE, OFFSET, K)                                          \
    do {                                                                                    \
        WIDE tau_ = TO_WIDE(finetuned[K]) - TO_WIDE(base[K]);                               \
        if (weighted)                                                                       \
            tau_ *= weight;                                                                 \
        if (lone_exact && count[OFFSET] == 0) {                                             \
            lone[OFFSET] = finetuned[K];                                                    \
            unit[OFFSET] = (uint8_t)!weighted;                                              \
        }                                                                                   \
        total[OFFSET] += tau_;                                                              \
        count[OFFSET] += 1;                                                                 \
    } while (0)

#define ACCUMULATE(WIDE, TO_WIDE, OFFSET, K)                                                \
    do {                                                                                    \
        marks[(OFFSET) >> 6] |= (uint64_t)1 << ((OFFSET) & 63);                             \
        ACCUMULATE_VALUE(WIDE, TO_WIDE, OFFSET, K);                                         \
    } while (0)

/* Set marks of elements offset .. offset + n - 1. */
static inline void mark_range(uint64_t *marks, int64_t offset, int64_t n)
{
    while (n > 0) {
        int64_t bit = offset & 63, take = 64 - bit < n ? 64 - bit : n;
        uint64_t ones = take == 64 ? ~(uint64_t)0 : (((uint64_t)1 << take) - 1u);
        marks[offset >> 6] |= ones << bit;
        offset += take;
        n -= take;
    }
}

/* Set the marks of `word` (64 elements from offset on; bits past the window are clear). */
static inline void mark_word(uint64_t *marks, int64_t offset, uint64_t word)
{
    int64_t bit = offset & 63;
    marks[offset >> 6] |= word << bit;
    if (bit && (word >> (64 - bit)))
        marks[(offset >> 6) + 1] |= word >> (64 - bit);
}

static inline uint64_t bits_at(const uint8_t *bytes, uint64_t bit);
static inline uint64_t tail_bits(const uint8_t *bytes, uint64_t bit, uint64_t n);

/* ---- 64 marks of a bitmap record at a time, in AVX2 (x86-64, where the CPU has it) ---- */

/* A word of marks (some clear) merges eight elements at a time: each byte of marks picks,
 * through a shuffle table, which of the record's next entries land in which of its eight
 * elements; the entries are widened, subtracted, weighted and added exactly as
 * ACCUMULATE_VALUE does (the same IEEE operations in the same order, vector lanes instead
 * of scalars), and only the marked lanes of total[], count[], lone[] and unit[] change. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
static int cpu_has_avx2;                            /* the CPU has AVX2: set at import */
static int merge_words_f16_ok;                      /* and F16C */
static uint8_t EXPAND16[256][16];                   /* pshufb: 8 x 16-bit entries to lanes */
static int32_t EXPAND32[256][8];                    /* permutevar: 8 x 32-bit entries */
static int32_t LANES[256][8];                       /* -1 in the marked lanes */
static int16_t LANES16[256][8];
static uint8_t COMPRESS16[256][16];                 /* pshufb: marked 16-bit lanes packed */
static int32_t COMPRESS32[256][8];                  /* permutevar: marked 32-bit lanes packed */
static uint8_t POP8[256];

static void merge_words_init(void)
{
    for (int m = 0; m < 256; m++) {
        int s = 0;
        for (int lane = 0; lane < 8; lane++) {
            int marked = m >> lane & 1;
            EXPAND16[m][2 * lane] = marked ? (uint8_t)(2 * s) : 0x80u;
            EXPAND16[m][2 * lane + 1] = marked ? (uint8_t)(2 * s + 1) : 0x80u;
            EXPAND32[m][lane] = marked ? s : 0;
            LANES[m][lane] = marked ? -1 : 0;
            LANES16[m][lane] = (int16_t)LANES[m][lane];
            if (marked) {
                COMPRESS16[m][2 * s] = (uint8_t)(2 * lane);
                COMPRESS16[m][2 * s + 1] = (uint8_t)(2 * lane + 1);
                COMPRESS32[m][s] = lane;
            }
            s += marked;
        }
        for (int rest = s; rest < 8; rest++) {  /* lanes past the marked ones: anything */
            COMPRESS16[m][2 * rest] = COMPRESS16[m][2 * rest + 1] = 0x80u;
            COMPRESS32[m][rest] = 0;
        }
        POP8[m] = (uint8_t)s;
    }
    __builtin_cpu_init();
    cpu_has_avx2 = __builtin_cpu_supports("avx2");
    merge_words_f16_ok = cpu_has_avx2 && __builtin_cpu_supports("f16c");
}

/* Eight elements' lone[] and unit[] where they are first touched (lone_exact). */
__attribute__((target("avx2")))
static inline void first_touch(__m256i lanes, __m256i counts, const void *entries,
                               void *lone, int wide32, uint8_t *unit, int weighted)
{
    __m256i first = _mm256_and_si256(lanes, _mm256_cmpeq_epi32(counts, _mm256_setzero_si256()));
    if (wide32) {
        __m256i old = _mm256_loadu_si256((const __m256i *)lone);
        __m256i new = _mm256_loadu_si256((const __m256i *)entries);
        _mm256_storeu_si256((__m256i *)lone, _mm256_blendv_epi8(old, new, first));
    } else {
        __m128i first16 = _mm_packs_epi32(_mm256_castsi256_si128(first),
                                          _mm256_extracti128_si256(first, 1));
        __m128i old = _mm_loadu_si128((const __m128i *)lone);
        __m128i new = _mm_loadu_si128((const __m128i *)entries);
        _mm_storeu_si128((__m128i *)lone, _mm_blendv_epi8(old, new, first16));
    }
    __m128i first16 = _mm_packs_epi32(_mm256_castsi256_si128(first),
                                      _mm256_extracti128_si256(first, 1));
    uint64_t mask = (uint64_t)_mm_cvtsi128_si64(_mm_packs_epi16(first16, first16)), u;
    memcpy(&u, unit, 8);
    u = (u & ~mask) | (mask & (weighted ? 0 : 0x0101010101010101ull));
    memcpy(unit, &u, 8);
}

/* The lanes' sum: total + tau where marked, total elsewhere; count + 1 where marked. */
__attribute__((target("avx2")))
static inline void add_lanes(__m256 tau, __m256i lanes, float *total, uint32_t *count)
{
    __m256 before = _mm256_loadu_ps(total);
    _mm256_storeu_ps(total, _mm256_blendv_ps(before, _mm256_add_ps(before, tau),
                                             _mm256_castsi256_ps(lanes)));
    __m256i c = _mm256_loadu_si256((const __m256i *)count);
    _mm256_storeu_si256((__m256i *)count, _mm256_sub_epi32(c, lanes));
}

/* A word of 16-bit float marks; the record holds at least 64 entries from `finetuned` on.
 * WIDEN turns eight 16-bit floats into eight floats: bfloat16 by a shift; float16 by F16C,
 * exactly as f16_wide does except that a signalling NaN comes out quiet (a NaN sum is
 * written as the canonical NaN either way). */
#define DEFINE_MERGE_WORD16(NAME, TARGET, WIDEN)                                             \
    __attribute__((target(TARGET)))                                                         \
    static void NAME(uint64_t word, const uint16_t *finetuned, const uint16_t *base,        \
                     float *total, uint32_t *count, uint16_t *lone, uint8_t *unit,          \
                     int weighted, float weight, int lone_exact)                            \
    {                                                                                       \
        const __m256 w = _mm256_set1_ps(weight);                                            \
        for (int byte = 0; byte < 8; byte++, word >>= 8) {                                  \
            unsigned m = (unsigned)(word & 0xFFu);                                          \
            if (!m)                                                                         \
                continue;                                                                   \
            int at = 8 * byte;                                                              \
            __m128i shuffle = _mm_loadu_si128((const __m128i *)EXPAND16[m]);                \
            __m128i f16 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)finetuned),     \
                                           shuffle);                                        \
            __m128i b16 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)base), shuffle); \
            __m256 tau = _mm256_sub_ps(WIDEN(f16), WIDEN(b16));                             \
            if (weighted)                                                                   \
                tau = _mm256_mul_ps(tau, w);                                                \
            __m256i lanes = _mm256_loadu_si256((const __m256i *)LANES[m]);                  \
            if (lone_exact) {                                                               \
                uint16_t spread[8];                                                         \
                _mm_storeu_si128((__m128i *)spread, f16);                                   \
                first_touch(lanes, _mm256_loadu_si256((const __m256i *)(count + at)),       \
                            spread, lone + at, 0, unit + at, weighted);                     \
            }                                                                               \
            add_lanes(tau, lanes, total + at, count + at);                                  \
            finetuned += POP8[m];                                                           \
            base += POP8[m];                                                                \
        }                                                                                   \
    }

#define WIDEN_BF16(x) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16))
DEFINE_MERGE_WORD16(merge_word_bf16, "avx2", WIDEN_BF16)
DEFINE_MERGE_WORD16(merge_word_f16_f16c, "avx2,f16c", _mm256_cvtph_ps)

/* A word of float32 marks; the record holds at least 64 entries from `finetuned` on. */
__attribute__((target("avx2")))
static void merge_word_f32(uint64_t word, const uint32_t *finetuned, const uint32_t *base,
                           float *total, uint32_t *count, uint32_t *lone, uint8_t *unit,
                           int weighted, float weight, int lone_exact)
{
    const __m256 w = _mm256_set1_ps(weight);
    for (int byte = 0; byte < 8; byte++, word >>= 8) {
        unsigned m = (unsigned)(word & 0xFFu);
        if (!m)
            continue;
        int at = 8 * byte;
        __m256i index = _mm256_loadu_si256((const __m256i *)EXPAND32[m]);
        __m256i lanes = _mm256_loadu_si256((const __m256i *)LANES[m]);
        __m256i f32 = _mm256_and_si256(lanes, _mm256_permutevar8x32_epi32(
            _mm256_loadu_si256((const __m256i *)finetuned), index));
        __m256i b32 = _mm256_and_si256(lanes, _mm256_permutevar8x32_epi32(
            _mm256_loadu_si256((const __m256i *)base), index));
        __m256 tau = _mm256_sub_ps(_mm256_castsi256_ps(f32), _mm256_castsi256_ps(b32));
        if (weighted)
            tau = _mm256_mul_ps(tau, w);
        if (lone_exact) {
            uint32_t spread[8];
            _mm256_storeu_si256((__m256i *)spread, f32);
            first_touch(lanes, _mm256_loadu_si256((const __m256i *)(count + at)), spread,
                        lone + at, 1, unit + at, weighted);
        }
        add_lanes(tau, lanes, total + at, count + at);
        finetuned += POP8[m];
        base += POP8[m];
    }
}

/* bitmap_move of a word of marks (some clear), eight elements at a time: the marked
 * elements of `block` packed into `values` (get), or `values` spread onto them (put);
 * `values` holds at least 64 entries from here (8 more may be read or written past the
 * word's own: the caller checks). */
__attribute__((target("avx2")))
static void move_word_16(uint64_t word, uint16_t *block, uint16_t *values, int put)
{
    for (int byte = 0; byte < 8; byte++, word >>= 8, block += 8) {
        unsigned m = (unsigned)(word & 0xFFu);
        if (!m)
            continue;
        if (put) {
            __m128i spread = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)values),
                                              _mm_loadu_si128((const __m128i *)EXPAND16[m]));
            __m128i old = _mm_loadu_si128((const __m128i *)block);
            _mm_storeu_si128((__m128i *)block, _mm_blendv_epi8(
                old, spread, _mm_loadu_si128((const __m128i *)LANES16[m])));
        } else {
            _mm_storeu_si128((__m128i *)values, _mm_shuffle_epi8(
                _mm_loadu_si128((const __m128i *)block),
                _mm_loadu_si128((const __m128i *)COMPRESS16[m])));
        }
        values += POP8[m];
    }
}

__attribute__((target("avx2")))
static void move_word_32(uint64_t word, uint32_t *block, uint32_t *values, int put)
{
    for (int byte = 0; byte < 8; byte++, word >>= 8, block += 8) {
        unsigned m = (unsigned)(word & 0xFFu);
        if (!m)
            continue;
        if (put) {
            __m256i spread = _mm256_permutevar8x32_epi32(
                _mm256_loadu_si256((const __m256i *)values),
                _mm256_loadu_si256((const __m256i *)EXPAND32[m]));
            __m256i old = _mm256_loadu_si256((const __m256i *)block);
            _mm256_storeu_si256((__m256i *)block, _mm256_blendv_epi8(
                old, spread, _mm256_loadu_si256((const __m256i *)LANES[m])));
        } else {
            _mm256_storeu_si256((__m256i *)values, _mm256_permutevar8x32_epi32(
                _mm256_loadu_si256((const __m256i *)block),
                _mm256_loadu_si256((const __m256i *)COMPRESS32[m])));
        }
        values += POP8[m];
    }
}
#else
static const int cpu_has_avx2 = 0, merge_words_f16_ok = 0;
static void merge_words_init(void) {}
static void merge_word_f16_f16c(uint64_t word, const uint16_t *finetuned, const uint16_t *base,
                                float *total, uint32_t *count, uint16_t *lone, uint8_t *unit,
                                int weighted, float weight, int lone_exact) {}
static void move_word_16(uint64_t word, uint16_t *block, uint16_t *values, int put) {}
static void move_word_32(uint64_t word, uint32_t *block, uint32_t *values, int put) {}
static void merge_word_bf16(uint64_t word, const uint16_t *finetuned, const uint16_t *base,
                            float *total, uint32_t *count, uint16_t *lone, uint8_t *unit,
                            int weighted, float weight, int lone_exact) {}
static void merge_word_f32(uint64_t word, const uint32_t *finetuned, const uint32_t *base,
                           float *total, uint32_t *count, uint32_t *lone, uint8_t *unit,
                           int weighted, float weight, int lone_exact) {}
#endif
/* 1- and 8-byte items and float64 words take the scalar loops (never called). */
static void move_word_8(uint64_t word, uint8_t *block, uint8_t *values, int put) {}
static void move_word_64(uint64_t word, uint64_t *block, uint64_t *values, int put) {}
static void merge_word_f64(uint64_t word, const uint64_t *finetuned, const uint64_t *base,
                           double *total, uint32_t *count, uint64_t *lone, uint8_t *unit,
                           int weighted, double weight, int lone_exact) {}


/* ACCUMULATE_VALUE of n consecutive entries into n consecutive elements, as loops the
 * compiler vectorizes. */
#define DEFINE_MERGE_RUN(NAME, BITS, WIDE, TO_WIDE)                                          \
    VECTOR_CLONES static void NAME(const BITS *restrict finetuned, const BITS *restrict base, \
                                   WIDE *restrict total, uint32_t *restrict count,          \
                                   BITS *restrict lone, uint8_t *restrict unit, Py_ssize_t n, \
                                   int weighted, WIDE weight, int lone_exact)               \
    {                                                                                       \
        if (lone_exact) {                                                                   \
            uint8_t one = (uint8_t)!weighted;                                               \
            for (Py_ssize_t j = 0; j < n; j++) {                                            \
                int first_ = count[j] == 0;                                                 \
                lone[j] = first_ ? finetuned[j] : lone[j];                                  \
                unit[j] = first_ ? one : unit[j];                                           \
            }                                                                               \
        }                                                                                   \
        if (weighted) {                                                                     \
            for (Py_ssize_t j = 0; j < n; j++) {                                            \
                WIDE tau_ = TO_WIDE(finetuned[j]) - TO_WIDE(base[j]);                       \
                tau_ *= weight;                                                             \
                total[j] += tau_;                                                           \
                count[j] += 1;                                                              \
            }                                                                               \
        } else {                                                                            \
            for (Py_ssize_t j = 0; j < n; j++) {                                            \
                total[j] += TO_WIDE(finetuned[j]) - TO_WIDE(base[j]);                       \
                count[j] += 1;                                                              \
            }                                                                               \
        }                                                                                   \
    }

/* The finishing of n consecutive touched elements (each counted at least once). */
#define DEFINE_FINISH_RUN(NAME, BITS, WIDE, TO_WIDE, ROUND)                                  \
    VECTOR_CLONES static void NAME(BITS *restrict target, WIDE *restrict total,             \
                                   uint32_t *restrict count, const BITS *restrict lone,     \
                                   const uint8_t *restrict unit, Py_ssize_t n, int mean,    \
                                   WIDE scale, int lone_exact, BITS canonical_nan)          \
    {                                                                                       \
        if (mean) {                                                                         \
            for (Py_ssize_t j = 0; j < n; j++) {                                            \
                WIDE merged = TO_WIDE(target[j]) + total[j] / (WIDE)count[j];               \
                BITS rounded = merged != merged ? canonical_nan : ROUND(merged);            \
                int lone_here = lone_exact & (count[j] == 1) & unit[j];                     \
                target[j] = lone_here ? lone[j] : rounded;                                  \
                total[j] = 0;                                                               \
                count[j] = 0;                                                               \
            }                                                                               \
        } else {                                                                            \
            for (Py_ssize_t j = 0; j < n; j++) {                                            \
                WIDE merged = TO_WIDE(target[j]) + scale * total[j];                        \
                target[j] = merged != merged ? canonical_nan : ROUND(merged);               \
                total[j] = 0;                                                               \
                count[j] = 0;                                                               \
            }                                                                               \
        }                                                                                   \
    }

#define DEFINE_MERGE(NAME, BITS, WIDE, TO_WIDE, ROUND, WORD, WORD_OK)                      \
    DEFINE_MERGE_RUN(NAME##_run, BITS, WIDE, TO_WIDE)                                        \
    DEFINE_FINISH_RUN(NAME##_finish, BITS, WIDE, TO_WIDE, ROUND)                             \
    static Py_ssize_t NAME(BITS *restrict block, int64_t first, Py_ssize_t size,             \
                           Record *records, Py_ssize_t n_records, int mean, WIDE scale,     \
                           int lone_exact, BITS canonical_nan, WIDE *restrict total,        \
                           uint32_t *restrict count, uint64_t *restrict marks,              \
                           BITS *restrict lone, uint8_t *restrict unit,                     \
                           Py_ssize_t window)                                               \
    {                                                                                       \
        memset(total, 0, (size_t)window * sizeof(WIDE));                                    \
        memset(count, 0, (size_t)window * sizeof(uint32_t));                                \
        memset(marks, 0, (size_t)((window + 63) / 64) * 8);                                 \
        for (Py_ssize_t at = 0; at < size; at += window) {                                  \
            int64_t start = first + at;                                                     \
            Py_ssize_t width = size - at < window ? size - at : window;                     \
            int64_t stop = start + width;                                                   \
            for (Py_ssize_t r = 0; r < n_records; r++) {                                    \
                Record *rec = &records[r];                                                  \
                const BITS *restrict finetuned = rec->finetuned.buf;                        \
                const BITS *restrict base = rec->base.buf;                                  \
                int weighted = rec->weight != 1.0;                                          \
                WIDE weight = (WIDE)rec->weight;                                            \
                Py_ssize_t n = rec->count;                                                  \
                if (rec->bitmap) {                                                          \
                    const uint8_t *bits = rec->positions.buf;                               \
                    int64_t end = rec->first + (int64_t)((uint64_t)rec->positions.len * 8u  \
                                                         - rec->bit);                       \
                    int64_t lo = start > rec->first ? start : rec->first;                   \
                    int64_t hi = stop < end ? stop : end;                                   \
                    Py_ssize_t k = rec->cursor;                                             \
                    for (int64_t p = lo; p < hi; p += 64) {                                 \
                        uint64_t b = (uint64_t)(p - rec->first) + rec->bit;                 \
                        int64_t span = hi - p < 64 ? hi - p : 64;                           \
                        uint64_t word = span == 64 ? bits_at(bits, b)                       \
                                                   : tail_bits(bits, b, (uint64_t)span);    \
                        if (!word)                                                          \
                            continue;                                                       \
                        int64_t offset = p - start;                                         \
                        Py_ssize_t ones = __builtin_popcountll(word);                       \
                        if (ones > n - k)                                                   \
                            return r;  /* more marks than values */                         \
                        mark_word(marks, offset, word);                                     \
                        if (ones == 64) {                                                   \
                            NAME##_run(finetuned + k, base + k, total + offset,             \
                                       count + offset, lone + offset, unit + offset, 64,    \
                                       weighted, weight, lone_exact);                       \
                            k += 64;                                                        \
                            continue;                                                       \
                        }                                                                   \
                        /* a whole word: 64 elements of scratch, 64 entries read at most */ \
                        if ((WORD_OK) && span == 64 && n - k >= 64) {                       \
                            WORD(word, finetuned + k, base + k, total + offset,             \
                                 count + offset, lone + offset, unit + offset, weighted,    \
                                 weight, lone_exact);                                       \
                            k += ones;                                                      \
                            continue;                                                       \
                        }                                                                   \
                        for (; word; word &= word - 1u) {                                   \
                            int64_t o_ = offset + __builtin_ctzll(word);                    \
                            ACCUMULATE_VALUE(WIDE, TO_WIDE, o_, k);                         \
                            k++;                                                            \
                        }                                                                   \
                    }                                                                       \
                    rec->cursor = k;                                                        \
                    continue;                                                               \
                }                                                                           \
                if (rec->dense) {                                                           \
                    int64_t lo = start > rec->first ? start : rec->first;                   \
                    int64_t hi = stop < rec->first + n ? stop : rec->first + n;             \
                    if (hi > lo) {                                                          \
                        int64_t offset = lo - start;                                        \
                        Py_ssize_t k = (Py_ssize_t)(lo - rec->first);                       \
                        mark_range(marks, offset, hi - lo);                                 \
                        NAME##_run(finetuned + k, base + k, total + offset, count + offset, \
                                   lone + offset, unit + offset, (Py_ssize_t)(hi - lo),     \
                                   weighted, weight, lone_exact);                           \
                    }                                                                       \
                    continue;                                                               \
                }                                                                           \
                const int64_t *restrict positions = rec->positions.buf;                     \
                Py_ssize_t i = rec->cursor;                                                 \
                int64_t previous = start - 1;                                               \
                for (; i < n && positions[i] < stop; i++) {                                 \
                    if (positions[i] <= previous)                                           \
                        return r;                                                           \
                    previous = positions[i];                                                \
                    int64_t offset = positions[i] - start;                                  \
                    ACCUMULATE(WIDE, TO_WIDE, offset, i);                                   \
                }                                                                           \
                rec->cursor = i;                                                            \
            }                                                                               \
            BITS *target = block + at;                                                      \
            for (Py_ssize_t w = 0; w < (width + 63) / 64; w++) {                            \
                uint64_t m = marks[w];                                                      \
                if (!m) continue;                                                           \
                marks[w] = 0;                                                               \
                if (m == ~(uint64_t)0) {                                                    \
                    Py_ssize_t j = w * 64;                                                  \
                    NAME##_finish(target + j, total + j, count + j, lone + j, unit + j, 64, \
                                  mean, scale, lone_exact, canonical_nan);                  \
                    continue;                                                               \
                }                                                                           \
                for (; m; m &= m - 1) {                                                     \
                    int b = __builtin_ctzll(m);                                             \
                    Py_ssize_t j = w * 64 + b;                                              \
                    if (lone_exact && count[j] == 1 && unit[j]) {                           \
                        target[j] = lone[j];                                                \
                    } else {                                                                \
                        WIDE update = mean ? total[j] / (WIDE)count[j] : scale * total[j];  \
                        WIDE merged = TO_WIDE(target[j]) + update;                          \
                        target[j] = merged != merged ? canonical_nan : ROUND(merged);       \
                    }                                                                       \
                    total[j] = 0;                                                           \
                    count[j] = 0;                                                           \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        return -1;                                                                          \
    }

DEFINE_MERGE(merge_bf16, uint16_t, float, bf16_wide, bf16_round, merge_word_bf16, cpu_has_avx2)
DEFINE_MERGE(merge_f16, uint16_t, float, f16_wide, f16_round, merge_word_f16_f16c,
             merge_words_f16_ok)
DEFINE_MERGE(merge_f32, uint32_t, float, f32_wide, f32_round, merge_word_f32, cpu_has_avx2)
DEFINE_MERGE(merge_f64, uint64_t, double, f64_wide, f64_round, merge_word_f64, 0)

static int get_buffer(PyObject *object, Py_buffer *view, int writable, Py_ssize_t itemsize,
                      const char *what)
{
    if (PyObject_GetBuffer(object, view, writable ? PyBUF_CONTIG : PyBUF_CONTIG_RO) < 0)
        return -1;
    if (view->itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "%s has %zd-byte items, expected %zd", what,
                     view->itemsize, itemsize);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

/* Whether ``kind`` names a float dtype the loops handle (else a ValueError is set). */
static int known_kind(int kind)
{
    if (kind >= KIND_BF16 && kind <= KIND_F64)
        return 1;
    PyErr_Format(PyExc_ValueError, "unknown dtype kind %d", kind);
    return 0;
}

/* Release a view taken by get_buffer or PyObject_GetBuffer, if one was taken. */
static void release(Py_buffer *view)
{
    if (view->obj)
        PyBuffer_Release(view);
}

static Py_ssize_t lower_bound(const int64_t *positions, Py_ssize_t count, int64_t value)
{
    Py_ssize_t lo = 0, hi = count;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (positions[mid] < value)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static Py_ssize_t count_bits(const uint8_t *bytes, unsigned long long first, Py_ssize_t n);

PyDoc_STRVAR(merge_block_doc,
"merge_block(kind, block, first, records, mean, scale, lone_exact, canonical_nan, total, count)\n"
"\n"
"BlockMerge's merge of an elementwise rule into ``block`` (the flat bits of elements\n"
"``first, first + 1, ...``), in place.  ``kind`` is 0..3 for BF16, F16, F32, F64;\n"
"``records`` a sequence of ``(positions int64, fine-tuned bits, base bits, weight)`` or,\n"
"for a record of every element from ``start`` on, ``(None, fine-tuned bits, base bits,\n"
"weight, start)``, or, for the elements a bitmap marks (bit ``bit`` of its uint8 bytes is\n"
"element ``start``), ``(bytes, fine-tuned bits, base bits, weight, start, bit)``, the\n"
"bits holding the values of every marked element from ``start`` on; ``lone_exact``: an element one record of weight 1 covers takes its\n"
"fine-tuned bits; ``total`` (wide floats) and ``count`` (uint32) are scratch of the\n"
"window's size; a ValueError leaves the block partly merged.");

static PyObject *merge_block(PyObject *self, PyObject *args)
{
    int kind, mean, lone_exact;
    long long first;
    double scale;
    unsigned long long canonical_nan;
    PyObject *block_object, *records_object, *total_object, *count_object;
    if (!PyArg_ParseTuple(args, "iOLOpdpKOO", &kind, &block_object, &first, &records_object,
                          &mean, &scale, &lone_exact, &canonical_nan, &total_object,
                          &count_object))
        return NULL;
    if (!known_kind(kind))
        return NULL;
    Py_ssize_t itemsize = KIND_ITEMSIZE[kind], wide_size = kind == KIND_F64 ? 8 : 4;
    PyObject *sequence = PySequence_Fast(records_object, "records must be a sequence");
    if (sequence == NULL)
        return NULL;
    Py_ssize_t n_records = PySequence_Fast_GET_SIZE(sequence);
    Record *records = PyMem_Calloc(n_records ? n_records : 1, sizeof(Record));
    Py_buffer block = {0}, total = {0}, count = {0};
    PyObject *result = NULL;
    Py_ssize_t held = 0;
    uint64_t *marks = NULL;
    uint8_t *unit = NULL;
    void *lone = NULL;
    if (records == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_buffer(block_object, &block, 1, itemsize, "block") < 0 ||
        get_buffer(total_object, &total, 1, wide_size, "total") < 0 ||
        get_buffer(count_object, &count, 1, 4, "count") < 0)
        goto done;
    Py_ssize_t window = count.len / 4;
    if (window < 1 || total.len / wide_size < window) {
        PyErr_SetString(PyExc_ValueError, "total and count must hold a window of 1 or more");
        goto done;
    }
    for (; held < n_records; held++) {
        Record *rec = &records[held];
        PyObject *positions, *finetuned, *base;
        long long dense_first = 0, bit = -1;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(sequence, held), "OOOd|LL;a record is "
                              "(positions, fine-tuned bits, base bits, weight[, start[, bit]])",
                              &positions, &finetuned, &base, &rec->weight, &dense_first, &bit))
            goto done;
        rec->bitmap = bit >= 0;
        rec->dense = positions == Py_None && !rec->bitmap;
        rec->first = dense_first;
        rec->bit = rec->bitmap ? (uint64_t)bit : 0;
        if (!rec->dense && get_buffer(positions, &rec->positions, 0, rec->bitmap ? 1 : 8,
                                      rec->bitmap ? "bitmap" : "positions") < 0)
            goto done;
        if (rec->bitmap && (bit > 7 || rec->positions.len < 1 || dense_first < 0)) {
            held++;
            PyErr_SetString(PyExc_ValueError, "a bitmap record needs its bytes, a bit of 0..7 "
                                              "and a start of 0 or more");
            goto done;
        }
        if (get_buffer(finetuned, &rec->finetuned, 0, itemsize, "fine-tuned bits") < 0 ||
            get_buffer(base, &rec->base, 0, itemsize, "base bits") < 0) {
            held++;  /* release what this record got */
            goto done;
        }
        rec->count = rec->dense || rec->bitmap ? rec->finetuned.len / itemsize
                                                : rec->positions.len / 8;
        if (rec->finetuned.len / itemsize != rec->count || rec->base.len / itemsize != rec->count) {
            held++;
            PyErr_SetString(PyExc_ValueError, "a record's positions and bits differ in length");
            goto done;
        }
        if (rec->dense && (dense_first < 0 || dense_first > INT64_MAX - rec->count)) {
            held++;
            PyErr_SetString(PyExc_ValueError, "a dense record's start is out of range");
            goto done;
        }
        if (rec->bitmap) {  /* the values of the elements before `first` are behind */
            int64_t before = first - rec->first;
            int64_t span = (int64_t)((uint64_t)rec->positions.len * 8u - rec->bit);
            rec->cursor = before <= 0 ? 0 : count_bits(rec->positions.buf, rec->bit,
                                                       (Py_ssize_t)(before < span ? before
                                                                                  : span));
        } else {
            rec->cursor = rec->dense ? 0 : lower_bound(rec->positions.buf, rec->count, first);
        }
    }
    Py_ssize_t size = block.len / itemsize, bad = -1;
    if (window > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "the window must be under 2^32 elements");
        goto done;
    }
    marks = PyMem_RawMalloc((size_t)((window + 63) / 64) * 8);
    unit = PyMem_RawCalloc((size_t)window, 1);
    lone = PyMem_RawMalloc((size_t)window * (size_t)itemsize);
    if (marks == NULL || unit == NULL || lone == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    lone_exact = lone_exact && mean;
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case KIND_BF16:
        bad = merge_bf16(block.buf, first, size, records, n_records, mean, (float)scale,
                         lone_exact, (uint16_t)canonical_nan, total.buf, count.buf, marks,
                         lone, unit, window);
        break;
    case KIND_F16:
        bad = merge_f16(block.buf, first, size, records, n_records, mean, (float)scale,
                        lone_exact, (uint16_t)canonical_nan, total.buf, count.buf, marks,
                        lone, unit, window);
        break;
    case KIND_F32:
        bad = merge_f32(block.buf, first, size, records, n_records, mean, (float)scale,
                        lone_exact, (uint32_t)canonical_nan, total.buf, count.buf, marks,
                        lone, unit, window);
        break;
    default:
        bad = merge_f64(block.buf, first, size, records, n_records, mean, scale,
                        lone_exact, (uint64_t)canonical_nan, total.buf, count.buf, marks,
                        lone, unit, window);
    }
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        PyErr_Format(PyExc_ValueError, "record %zd's positions are not strictly increasing "
                     "(the block is partly merged)", bad);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    for (Py_ssize_t r = 0; r < held; r++) {
        release(&records[r].positions);
        release(&records[r].finetuned);
        release(&records[r].base);
    }
    PyMem_Free(records);
    PyMem_RawFree(marks);
    PyMem_RawFree(unit);
    PyMem_RawFree(lone);
    release(&block);
    release(&total);
    release(&count);
    Py_DECREF(sequence);
    return result;
}

/* ---- merging aligned fine-tuned blocks (merge.py) ---------------------------------- */

/* merge_block for records that each hold the fine-tuned bits of *every* element of the block,
 * where an element counts as stored exactly when its bits differ from the base's (the
 * changed-only selection of compress at density 1.0, read straight from full fine-tunes):
 * element by element, each record's weighted task vector is added in record order into a
 * running total, with the same operations (and their order) as merge_block's ACCUMULATE and
 * finishing pass, so the bits are identical; no positions, windows or marks.  `tunes` is a
 * sequence of (fine-tuned bits, weight). */
/* Chunks of elements whose sums stay in registers and L1: each record is added over a chunk
 * in one straight loop (blends instead of branches, so the compiler vectorizes it).  An
 * element a record leaves unchanged adds +0.0 to its total, which changes nothing: the total
 * starts at +0.0 and a round-to-nearest sum is never -0.0 unless both terms are. */
#define MERGE_CHANGED_CHUNK 512

#define ADD_CHANGED(WIDE, WBITS, TO_WIDE, WEIGHTED)                                           \
    for (Py_ssize_t j = 0; j < width; j++) {                                                \
        BITS_T f = tune[j], b = target[j];                                                  \
        WBITS changed = (WBITS)0 - (WBITS)(f != b);                                         \
        WIDE tau = TO_WIDE(f) - TO_WIDE(b);                                                 \
        if (WEIGHTED)                                                                       \
            tau *= weight;                                                                  \
        WBITS tau_bits;                                                                     \
        memcpy(&tau_bits, &tau, sizeof tau);                                                \
        tau_bits &= changed;                                                                \
        memcpy(&tau, &tau_bits, sizeof tau);                                                \
        WBITS first_here = changed & ((WBITS)0 - (WBITS)(count[j] == 0));                   \
        lone[j] = (lone[j] & ~first_here) | ((WBITS)f & first_here);                        \
        unit[j] = (unit[j] & ~first_here) | (unit_mask & first_here);                       \
        total[j] += tau;                                                                    \
        count[j] += changed & 1;                                                            \
    }

/* The finishing pass, with blends too: an element no record changed keeps the base's bits,
 * a lone one of weight 1 (with lone_exact) the fine-tune's, any other the rounded sum. */
#define FINISH_CHANGED(WIDE, WBITS, TO_WIDE, ROUND, UPDATE)                                  \
    for (Py_ssize_t j = 0; j < width; j++) {                                                \
        WIDE merged = TO_WIDE(target[j]) + (UPDATE);                                        \
        WBITS rounded = merged != merged ? (WBITS)canonical_nan : (WBITS)ROUND(merged);     \
        WBITS untouched = (WBITS)0 - (WBITS)(count[j] == 0);                                \
        WBITS lone_here = unit[j] & ((WBITS)0 - (WBITS)(lone_exact & (count[j] == 1)));     \
        WBITS value = (rounded & ~lone_here) | (lone[j] & lone_here);                       \
        target[j] = (BITS_T)((value & ~untouched) | ((WBITS)target[j] & untouched));        \
    }

#define DEFINE_MERGE_CHANGED(NAME, BITS, WIDE, WBITS, TO_WIDE, ROUND)                        \
    VECTOR_CLONES static void NAME(BITS *restrict block, Py_ssize_t size, const BITS **tunes,             \
                     const double *weights, Py_ssize_t n_tunes, int mean, WIDE scale,        \
                     int lone_exact, BITS canonical_nan)                                     \
    {                                                                                       \
        typedef BITS BITS_T;                                                                \
        WIDE total[MERGE_CHANGED_CHUNK];                                                    \
        WBITS count[MERGE_CHANGED_CHUNK], lone[MERGE_CHANGED_CHUNK], unit[MERGE_CHANGED_CHUNK]; \
        for (Py_ssize_t at = 0; at < size; at += MERGE_CHANGED_CHUNK) {                     \
            Py_ssize_t width = size - at < MERGE_CHANGED_CHUNK ? size - at : MERGE_CHANGED_CHUNK; \
            BITS *restrict target = block + at;                                             \
            memset(total, 0, sizeof total);                                                 \
            memset(count, 0, sizeof count);                                                 \
            memset(lone, 0, sizeof lone);                                                   \
            memset(unit, 0, sizeof unit);                                                   \
            for (Py_ssize_t r = 0; r < n_tunes; r++) {                                      \
                const BITS *restrict tune = tunes[r] + at;                                  \
                WIDE weight = (WIDE)weights[r];                                             \
                WBITS unit_mask = weights[r] == 1.0 ? ~(WBITS)0 : 0;                        \
                if (weights[r] == 1.0) {                                                    \
                    ADD_CHANGED(WIDE, WBITS, TO_WIDE, 0)                                    \
                } else {                                                                    \
                    ADD_CHANGED(WIDE, WBITS, TO_WIDE, 1)                                    \
                }                                                                           \
            }                                                                               \
            if (mean)                                                                       \
                FINISH_CHANGED(WIDE, WBITS, TO_WIDE, ROUND, total[j] / (WIDE)count[j])      \
            else                                                                            \
                FINISH_CHANGED(WIDE, WBITS, TO_WIDE, ROUND, scale * total[j])               \
        }                                                                                   \
    }

DEFINE_MERGE_CHANGED(merge_changed_bf16, uint16_t, float, uint32_t, bf16_wide, bf16_round)
DEFINE_MERGE_CHANGED(merge_changed_f16, uint16_t, float, uint32_t, f16_wide, f16_round)
DEFINE_MERGE_CHANGED(merge_changed_f32, uint32_t, float, uint32_t, f32_wide, f32_round)
DEFINE_MERGE_CHANGED(merge_changed_f64, uint64_t, double, uint64_t, f64_wide, f64_round)

PyDoc_STRVAR(merge_changed_doc,
"merge_changed(kind, block, tunes, mean, scale, lone_exact, canonical_nan)\n"
"\n"
"merge_block for records of every element of ``block`` (the base bits, merged in place)\n"
"that store exactly the elements whose bits differ from the base's: ``tunes`` is a\n"
"sequence of ``(fine-tuned bits, weight)``, each as long as the block.  Same bits as\n"
"merge_block given those elements as positions.");

static PyObject *merge_changed(PyObject *self, PyObject *args)
{
    int kind, mean, lone_exact;
    double scale;
    unsigned long long canonical_nan;
    PyObject *block_object, *tunes_object;
    if (!PyArg_ParseTuple(args, "iOOpdpK", &kind, &block_object, &tunes_object, &mean, &scale,
                          &lone_exact, &canonical_nan))
        return NULL;
    if (!known_kind(kind))
        return NULL;
    Py_ssize_t itemsize = KIND_ITEMSIZE[kind];
    PyObject *sequence = PySequence_Fast(tunes_object, "tunes must be a sequence");
    if (sequence == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(sequence), held = 0;
    Py_buffer block = {0};
    Py_buffer *views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    const void **tunes = PyMem_Calloc(n ? n : 1, sizeof(void *));
    double *weights = PyMem_Calloc(n ? n : 1, sizeof(double));
    PyObject *result = NULL;
    if (views == NULL || tunes == NULL || weights == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_buffer(block_object, &block, 1, itemsize, "block") < 0)
        goto done;
    for (; held < n; held++) {
        PyObject *bits;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(sequence, held),
                              "Od;a tune is (fine-tuned bits, weight)", &bits, &weights[held]))
            goto done;
        if (get_buffer(bits, &views[held], 0, itemsize, "fine-tuned bits") < 0)
            goto done;
        if (views[held].len != block.len) {
            held++;
            PyErr_SetString(PyExc_ValueError, "fine-tuned bits and block differ in length");
            goto done;
        }
        tunes[held] = views[held].buf;
    }
    Py_ssize_t size = block.len / itemsize;
    lone_exact = lone_exact && mean;
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case KIND_BF16:
        merge_changed_bf16(block.buf, size, (const uint16_t **)tunes, weights, n, mean,
                           (float)scale, lone_exact, (uint16_t)canonical_nan);
        break;
    case KIND_F16:
        merge_changed_f16(block.buf, size, (const uint16_t **)tunes, weights, n, mean,
                          (float)scale, lone_exact, (uint16_t)canonical_nan);
        break;
    case KIND_F32:
        merge_changed_f32(block.buf, size, (const uint32_t **)tunes, weights, n, mean,
                          (float)scale, lone_exact, (uint32_t)canonical_nan);
        break;
    default:
        merge_changed_f64(block.buf, size, (const uint64_t **)tunes, weights, n, mean, scale,
                          lone_exact, (uint64_t)canonical_nan);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    for (Py_ssize_t r = 0; r < held; r++)
        release(&views[r]);
    PyMem_Free(views);
    PyMem_Free(tunes);
    PyMem_Free(weights);
    release(&block);
    Py_DECREF(sequence);
    return result;
}

/* ---- decoding helpers (codecs/base.py, codecs/bitmap.py, format.py) ----------------- */

PyDoc_STRVAR(from_planes_doc,
"from_planes(raw, out, xor)\n"
"\n"
"Fill ``out`` (1-, 2-, 4- or 8-byte items) from its byte planes ``raw`` (all lowest\n"
"bytes, then all next bytes, ...), XOR-ed with ``xor`` (same items) unless it is None.");

/* Item i of n, of TYPE, from byte planes (little-endian: plane p holds the bytes 8p..). */
#define FROM_PLANES(TYPE, PLANES, N, I, OUT)                                                 \
    do {                                                                                    \
        TYPE value_ = 0;                                                                    \
        for (size_t plane_ = 0; plane_ < sizeof(TYPE); plane_++)                            \
            value_ |= (TYPE)(PLANES)[plane_ * (size_t)(N) + (size_t)(I)] << (8 * plane_);   \
        (OUT) = value_;                                                                     \
    } while (0)

#define DEFINE_FROM_PLANES(NAME, BITS)                                                       \
    static void NAME(const uint8_t *restrict raw, BITS *restrict out,                       \
                     const BITS *restrict xor, Py_ssize_t n)                                \
    {                                                                                       \
        for (Py_ssize_t i = 0; i < n; i++) {                                                \
            BITS value;                                                                     \
            FROM_PLANES(BITS, raw, n, i, value);                                            \
            out[i] = xor ? value ^ xor[i] : value;                                          \
        }                                                                                   \
    }

DEFINE_FROM_PLANES(from_planes_1, uint8_t)
DEFINE_FROM_PLANES(from_planes_2, uint16_t)
DEFINE_FROM_PLANES(from_planes_4, uint32_t)
DEFINE_FROM_PLANES(from_planes_8, uint64_t)

static PyObject *from_planes(PyObject *self, PyObject *args)
{
    PyObject *raw_object, *out_object, *xor_object;
    if (!PyArg_ParseTuple(args, "OOO", &raw_object, &out_object, &xor_object))
        return NULL;
    Py_buffer raw = {0}, out = {0}, xor = {0};
    PyObject *result = NULL;
    if (PyObject_GetBuffer(raw_object, &raw, PyBUF_CONTIG_RO) < 0 ||
        PyObject_GetBuffer(out_object, &out, PyBUF_CONTIG) < 0)
        goto done;
    Py_ssize_t width = out.itemsize, n = out.len / (width ? width : 1);
    if (width != 1 && width != 2 && width != 4 && width != 8) {
        PyErr_Format(PyExc_TypeError, "out has %zd-byte items, expected 1, 2, 4 or 8", width);
        goto done;
    }
    if (raw.len != out.len) {
        PyErr_Format(PyExc_ValueError, "%zd plane bytes for %zd output bytes", raw.len, out.len);
        goto done;
    }
    if (xor_object != Py_None &&
        get_buffer(xor_object, &xor, 0, width, "xor") < 0)
        goto done;
    if (xor.obj && xor.len != out.len) {
        PyErr_SetString(PyExc_ValueError, "xor and out differ in length");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    switch (width) {
    case 1: from_planes_1(raw.buf, out.buf, xor.buf, n); break;
    case 2: from_planes_2(raw.buf, out.buf, xor.buf, n); break;
    case 4: from_planes_4(raw.buf, out.buf, xor.buf, n); break;
    default: from_planes_8(raw.buf, out.buf, xor.buf, n);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&raw);
    release(&out);
    release(&xor);
    return result;
}

PyDoc_STRVAR(gap_decode_doc,
"gap_decode(gaps, out, limit) -> bool\n"
"\n"
"Positions from gaps (first position, then distance - 1; uint32 or uint64 items) into\n"
"int64 ``out``; False, with ``out`` partly written, if a position would reach ``limit``.");

#define DEFINE_GAP_DECODE(NAME, GAP)                                                         \
    static int NAME(const GAP *restrict gaps, int64_t *restrict out, Py_ssize_t n,          \
                    uint64_t limit)                                                         \
    {                                                                                       \
        uint64_t next = 0; /* the smallest position the next one may take */               \
        for (Py_ssize_t i = 0; i < n; i++) {                                                \
            uint64_t gap = gaps[i];                                                         \
            if (gap >= limit - next) /* also catches next == limit */                       \
                return 0;                                                                   \
            out[i] = (int64_t)(next + gap);                                                 \
            next += gap + 1;                                                                \
        }                                                                                   \
        return 1;                                                                           \
    }

DEFINE_GAP_DECODE(gap_decode_4, uint32_t)
DEFINE_GAP_DECODE(gap_decode_8, uint64_t)

static PyObject *gap_decode(PyObject *self, PyObject *args)
{
    PyObject *gaps_object, *out_object;
    unsigned long long limit;
    if (!PyArg_ParseTuple(args, "OOK", &gaps_object, &out_object, &limit))
        return NULL;
    Py_buffer gaps = {0}, out = {0};
    PyObject *result = NULL;
    if (PyObject_GetBuffer(gaps_object, &gaps, PyBUF_CONTIG_RO) < 0 ||
        get_buffer(out_object, &out, 1, 8, "out") < 0)
        goto done;
    if (gaps.itemsize != 4 && gaps.itemsize != 8) {
        PyErr_Format(PyExc_TypeError, "gaps has %zd-byte items, expected 4 or 8", gaps.itemsize);
        goto done;
    }
    Py_ssize_t n = gaps.len / gaps.itemsize;
    if (out.len / 8 != n || limit > (unsigned long long)INT64_MAX) {
        PyErr_SetString(PyExc_ValueError, "gaps and out differ in length, or limit is too big");
        goto done;
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = gaps.itemsize == 4 ? gap_decode_4(gaps.buf, out.buf, n, limit)
                            : gap_decode_8(gaps.buf, out.buf, n, limit);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(ok ? Py_True : Py_False);
done:
    release(&gaps);
    release(&out);
    return result;
}

PyDoc_STRVAR(bitmap_positions_doc,
"bitmap_positions(bits, out) -> int\n"
"\n"
"Write the indices of the set bits of ``bits`` (bytes, little-endian bit order) into\n"
"int64 ``out``, in increasing order, as far as it holds them; return how many are set.");

static PyObject *bitmap_positions(PyObject *self, PyObject *args)
{
    PyObject *bits_object, *out_object;
    if (!PyArg_ParseTuple(args, "OO", &bits_object, &out_object))
        return NULL;
    Py_buffer bits = {0}, out = {0};
    PyObject *result = NULL;
    if (PyObject_GetBuffer(bits_object, &bits, PyBUF_CONTIG_RO) < 0 ||
        get_buffer(out_object, &out, 1, 8, "out") < 0)
        goto done;
    Py_ssize_t found = 0, capacity = out.len / 8, n = bits.len;
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *bytes = bits.buf;
    int64_t *positions = out.buf;
    Py_ssize_t at = 0;
    for (; at + 8 <= n; at += 8) {
        uint64_t word;
        memcpy(&word, bytes + at, 8);  /* little-endian hosts only: see native.py */
        for (; word; word &= word - 1, found++)
            if (found < capacity)
                positions[found] = 8 * (int64_t)at + __builtin_ctzll(word);
    }
    for (; at < n; at++)
        for (unsigned bit = 0; bit < 8; bit++)
            if (bytes[at] >> bit & 1) {
                if (found < capacity)
                    positions[found] = 8 * (int64_t)at + bit;
                found++;
            }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(found);
done:
    release(&bits);
    release(&out);
    return result;
}

PyDoc_STRVAR(bitmap_count_doc,
"bitmap_count(bits, first, n) -> int\n"
"\n"
"How many of bits ``first`` ... ``first + n - 1`` of ``bits`` (bytes, little-endian bit\n"
"order) are set.");

/* Bits first ... first + n - 1 of ``bytes``, 64 at a time: ``word`` holds the bits of
 * elements at ... at + 63 (counted from ``first``; fewer, the others clear, in the last).
 * A word whose bits are all set or all clear costs one test, so dense and sparse windows
 * both avoid a branch per bit.  Only bytes holding bits of the range are read. */
static inline uint64_t bits_at(const uint8_t *bytes, uint64_t bit)
{
    uint64_t b = bit >> 3, word;
    unsigned shift = (unsigned)(bit & 7u);
    memcpy(&word, bytes + b, 8);  /* little-endian hosts only: see native.py */
    if (shift)
        word = (word >> shift) | ((uint64_t)bytes[b + 8] << (64u - shift));
    return word;
}

static inline uint64_t tail_bits(const uint8_t *bytes, uint64_t bit, uint64_t n)
{
    uint64_t word = 0;
    for (uint64_t t = 0; t < n; t++, bit++)
        word |= (uint64_t)((bytes[bit >> 3] >> (bit & 7u)) & 1u) << t;
    return word;
}

#define FOR_BITMAP_WORDS(bytes, first, n, BODY)                                            \
    do {                                                                                   \
        uint64_t n_ = (uint64_t)(n), at = 0;                                               \
        for (; at + 64 <= n_; at += 64) {                                                  \
            uint64_t word = bits_at((bytes), (uint64_t)(first) + at);                      \
            BODY                                                                           \
        }                                                                                  \
        if (at < n_) {                                                                     \
            uint64_t word = tail_bits((bytes), (uint64_t)(first) + at, n_ - at);           \
            BODY                                                                           \
        }                                                                                  \
    } while (0)

static int bitmap_range(Py_buffer *bits, unsigned long long first, Py_ssize_t n)
{
    if (n < 0 || (unsigned long long)bits->len * 8u < first + (unsigned long long)n) {
        PyErr_SetString(PyExc_ValueError, "bitmap range past the bits given");
        return -1;
    }
    return 0;
}

static Py_ssize_t count_bits(const uint8_t *bytes, unsigned long long first, Py_ssize_t n)
{
    Py_ssize_t found = 0;
    FOR_BITMAP_WORDS(bytes, first, n, { found += __builtin_popcountll(word); });
    return found;
}

static PyObject *bitmap_count(PyObject *self, PyObject *args)
{
    PyObject *bits_object;
    unsigned long long first;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "OKn", &bits_object, &first, &n))
        return NULL;
    Py_buffer bits = {0};
    PyObject *result = NULL;
    if (PyObject_GetBuffer(bits_object, &bits, PyBUF_CONTIG_RO) < 0 ||
        bitmap_range(&bits, first, n) < 0)
        goto done;
    Py_ssize_t found;
    Py_BEGIN_ALLOW_THREADS
    found = count_bits(bits.buf, first, n);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(found);
done:
    release(&bits);
    return result;
}

PyDoc_STRVAR(bitmap_move_doc,
"bitmap_move(bits, first, block, values, put)\n"
"\n"
"Element ``j`` of ``block`` is marked when bit ``first + j`` of ``bits`` is set; ``values``\n"
"holds the marked elements in order (as many as are marked, else ValueError; the same item\n"
"size).  ``put`` false: copy the marked elements of ``block`` into ``values`` (a gather);\n"
"true: copy ``values`` into them (a scatter).  No position array is built.");

#define DEFINE_BITMAP_MOVE(NAME, T, WORD, WORD_OK)                                         \
    static void NAME(const uint8_t *bytes, unsigned long long first, Py_ssize_t n,          \
                     T *restrict block, T *restrict values, int put, Py_ssize_t marked)     \
    {                                                                                      \
        Py_ssize_t i = 0;                                                                  \
        FOR_BITMAP_WORDS(bytes, first, n, {                                                \
            if (word == ~(uint64_t)0) {                                                    \
                if (put)                                                                   \
                    memcpy(block + at, values + i, 64 * sizeof(T));                        \
                else                                                                       \
                    memcpy(values + i, block + at, 64 * sizeof(T));                        \
                i += 64;                                                                   \
            } else if ((WORD_OK) && word && marked - i >= 64 && n - (Py_ssize_t)at >= 64) { \
                WORD(word, block + at, values + i, put);                                   \
                i += __builtin_popcountll(word);                                           \
            } else if (put) {                                                              \
                for (; word; word &= word - 1u)                                            \
                    block[at + __builtin_ctzll(word)] = values[i++];                       \
            } else {                                                                       \
                for (; word; word &= word - 1u)                                            \
                    values[i++] = block[at + __builtin_ctzll(word)];                       \
            }                                                                              \
        });                                                                                \
    }

DEFINE_BITMAP_MOVE(bitmap_move_1, uint8_t, move_word_8, 0)
DEFINE_BITMAP_MOVE(bitmap_move_2, uint16_t, move_word_16, cpu_has_avx2)
DEFINE_BITMAP_MOVE(bitmap_move_4, uint32_t, move_word_32, cpu_has_avx2)
DEFINE_BITMAP_MOVE(bitmap_move_8, uint64_t, move_word_64, 0)

static PyObject *bitmap_move(PyObject *self, PyObject *args)
{
    PyObject *bits_object, *block_object, *values_object;
    unsigned long long first;
    int put;
    if (!PyArg_ParseTuple(args, "OKOOp", &bits_object, &first, &block_object, &values_object,
                          &put))
        return NULL;
    Py_buffer bits = {0}, block = {0}, values = {0};
    PyObject *result = NULL;
    if (PyObject_GetBuffer(bits_object, &bits, PyBUF_CONTIG_RO) < 0 ||
        PyObject_GetBuffer(block_object, &block, put ? PyBUF_CONTIG : PyBUF_CONTIG_RO) < 0)
        goto done;
    Py_ssize_t itemsize = block.itemsize;
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_SetString(PyExc_TypeError, "bitmap_move moves 1, 2, 4 or 8-byte items");
        goto done;
    }
    if (get_buffer(values_object, &values, !put, itemsize, "values") < 0)
        goto done;
    Py_ssize_t n = block.len / itemsize, marked;
    if (bitmap_range(&bits, first, n) < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    marked = count_bits(bits.buf, first, n);
    Py_END_ALLOW_THREADS
    if (marked != values.len / itemsize) {
        PyErr_Format(PyExc_ValueError, "bitmap marks %zd elements, %zd values given", marked,
                     values.len / itemsize);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    switch (itemsize) {
    case 1: bitmap_move_1(bits.buf, first, n, block.buf, values.buf, put, marked); break;
    case 2: bitmap_move_2(bits.buf, first, n, block.buf, values.buf, put, marked); break;
    case 4: bitmap_move_4(bits.buf, first, n, block.buf, values.buf, put, marked); break;
    default: bitmap_move_8(bits.buf, first, n, block.buf, values.buf, put, marked); break;
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&bits);
    release(&block);
    release(&values);
    return result;
}

PyDoc_STRVAR(strictly_increasing_doc,
"strictly_increasing(positions) -> bool\n"
"\n"
"Whether every int64 of ``positions`` is greater than the one before.");

static PyObject *strictly_increasing(PyObject *self, PyObject *args)
{
    PyObject *positions_object;
    if (!PyArg_ParseTuple(args, "O", &positions_object))
        return NULL;
    Py_buffer positions = {0};
    if (get_buffer(positions_object, &positions, 0, 8, "positions") < 0)
        return NULL;
    const int64_t *p = positions.buf;
    Py_ssize_t n = positions.len / 8, i = 1;
    Py_BEGIN_ALLOW_THREADS
    for (; i < n && p[i] > p[i - 1]; i++)
        ;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&positions);
    return Py_NewRef(i >= n ? Py_True : Py_False);
}

PyDoc_STRVAR(rice_decode_doc,
"rice_decode(unary, remainders, k, unary_bits, out) -> (ones, last_set)\n"
"\n"
"codecs.rice.decode into uint64 ``out``: value i is (the zero bits before the i-th one bit\n"
"of ``unary``) << k | (the i-th k-bit field of ``remainders``), bits little-endian.  Only\n"
"the first ``unary_bits`` bits of ``unary`` count.  Returns how many one bits there are and\n"
"whether the last counted bit is one; ``out`` is filled as far as it holds values (the\n"
"caller checks the count; the byte lengths were checked by the caller too).");

/* The k-bit field starting at bit ``at`` of ``bytes`` (``n`` of them), little-endian. */
static inline uint64_t read_bits(const uint8_t *bytes, size_t n, uint64_t at, unsigned k)
{
    size_t first = (size_t)(at >> 3);
    unsigned shift = (unsigned)(at & 7);
    uint64_t word = 0;
    if (first + 8 <= n) {
        memcpy(&word, bytes + first, 8);  /* little-endian hosts only: see native.py */
    } else {
        for (size_t b = 0; first + b < n && b < 8; b++)
            word |= (uint64_t)bytes[first + b] << (8 * b);
    }
    return (word >> shift) & (k == 64 ? ~(uint64_t)0 : (((uint64_t)1 << k) - 1));
}

static PyObject *rice_decode(PyObject *self, PyObject *args)
{
    PyObject *unary_object, *remainders_object, *out_object;
    unsigned int k;
    unsigned long long unary_bits;
    if (!PyArg_ParseTuple(args, "OOIKO", &unary_object, &remainders_object, &k, &unary_bits,
                          &out_object))
        return NULL;
    if (k > 32)
        return PyErr_Format(PyExc_ValueError, "rice parameter %u is over 32", k);
    Py_buffer unary = {0}, remainders = {0}, out = {0};
    PyObject *result = NULL;
    if (PyObject_GetBuffer(unary_object, &unary, PyBUF_CONTIG_RO) < 0 ||
        PyObject_GetBuffer(remainders_object, &remainders, PyBUF_CONTIG_RO) < 0 ||
        get_buffer(out_object, &out, 1, 8, "out") < 0)
        goto done;
    if (unary_bits > (unsigned long long)unary.len * 8) {
        PyErr_SetString(PyExc_ValueError, "unary_bits exceeds the unary stream");
        goto done;
    }
    Py_ssize_t capacity = out.len / 8;
    if (k && (unsigned long long)capacity * k > (unsigned long long)remainders.len * 8) {
        PyErr_SetString(PyExc_ValueError, "the remainder stream is too short for out");
        goto done;
    }
    Py_ssize_t ones = 0;
    int last_set = 0;
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *bytes = unary.buf, *rest = remainders.buf;
    uint64_t *values = out.buf;
    uint64_t previous_end = (uint64_t)-1;  /* the bit before the first */
    for (uint64_t word_at = 0; word_at < unary_bits; word_at += 64) {
        uint64_t word = read_bits(bytes, (size_t)unary.len, word_at,
                                  unary_bits - word_at >= 64 ? 64 : (unsigned)(unary_bits - word_at));
        for (; word; word &= word - 1) {
            uint64_t end = word_at + (uint64_t)__builtin_ctzll(word);
            if (ones < capacity) {
                uint64_t quotient = end - previous_end - 1;
                uint64_t remainder = k ? read_bits(rest, (size_t)remainders.len,
                                                   (uint64_t)ones * k, k) : 0;
                values[ones] = (quotient << k) | remainder;
            }
            previous_end = end;
            ones++;
        }
    }
    last_set = unary_bits > 0 && previous_end == unary_bits - 1;
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nO", ones, last_set ? Py_True : Py_False);
done:
    release(&unary);
    release(&remainders);
    release(&out);
    return result;
}

PyDoc_STRVAR(rice_decode_at_doc,
"rice_decode_at(unary, remainders, k, unary_bits, start_bit, start_index, out)\n"
"    -> (found, next_bit)\n"
"\n"
"rice_decode from the middle of the streams, for decoding a record in chunks: the values\n"
"after the one bit ending at ``start_bit - 1`` (0: from the start), whose remainders start\n"
"at field ``start_index``, as many as ``out`` holds.  Returns how many were found (fewer\n"
"than ``out`` holds only at the end of the ``unary_bits`` bits) and the bit after the last\n"
"one decoded (``unary_bits`` when the stream ran out first).");

static PyObject *rice_decode_at(PyObject *self, PyObject *args)
{
    PyObject *unary_object, *remainders_object, *out_object;
    unsigned int k;
    unsigned long long unary_bits, start_bit, start_index;
    if (!PyArg_ParseTuple(args, "OOIKKKO", &unary_object, &remainders_object, &k, &unary_bits,
                          &start_bit, &start_index, &out_object))
        return NULL;
    if (k > 32)
        return PyErr_Format(PyExc_ValueError, "rice parameter %u is over 32", k);
    Py_buffer unary = {0}, remainders = {0}, out = {0};
    PyObject *result = NULL;
    if (PyObject_GetBuffer(unary_object, &unary, PyBUF_CONTIG_RO) < 0 ||
        PyObject_GetBuffer(remainders_object, &remainders, PyBUF_CONTIG_RO) < 0 ||
        get_buffer(out_object, &out, 1, 8, "out") < 0)
        goto done;
    if (unary_bits > (unsigned long long)unary.len * 8 || start_bit > unary_bits) {
        PyErr_SetString(PyExc_ValueError, "unary_bits or start_bit exceeds the unary stream");
        goto done;
    }
    Py_ssize_t capacity = out.len / 8;
    if (k && (start_index + (unsigned long long)capacity) * k
             > (unsigned long long)remainders.len * 8) {
        PyErr_SetString(PyExc_ValueError, "the remainder stream is too short for out");
        goto done;
    }
    Py_ssize_t found = 0;
    uint64_t next_bit = unary_bits;
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *bytes = unary.buf, *rest = remainders.buf;
    uint64_t *values = out.buf;
    uint64_t previous_end = start_bit - 1;  /* wraps to all ones for start_bit 0, as above */
    /* 56 bits at a time: read_bits takes 8 bytes, and start_bit need not be byte-aligned */
    for (uint64_t word_at = start_bit; word_at < unary_bits && found < capacity; word_at += 56) {
        uint64_t word = read_bits(bytes, (size_t)unary.len, word_at,
                                  unary_bits - word_at >= 56 ? 56 : (unsigned)(unary_bits - word_at));
        for (; word && found < capacity; word &= word - 1) {
            uint64_t end = word_at + (uint64_t)__builtin_ctzll(word);
            uint64_t remainder = k ? read_bits(rest, (size_t)remainders.len,
                                               (start_index + (uint64_t)found) * k, k) : 0;
            values[found++] = ((end - previous_end - 1) << k) | remainder;
            previous_end = end;
        }
    }
    if (found == capacity)
        next_bit = capacity ? previous_end + 1 : start_bit;
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nK", found, (unsigned long long)next_bit);
done:
    release(&unary);
    release(&remainders);
    release(&out);
    return result;
}

PyDoc_STRVAR(tau_decode_doc,
"tau_decode(kind, planes, base, out) -> int\n"
"\n"
"The ``tau`` value codec's first step into ``out``: round(wide(base) + tau) with tau read\n"
"from the byte planes of its wide bits, rounded as dtypes.from_wide does (NaN included);\n"
"``kind`` as for merge_block.  The caller applies the exceptions.  Returns how many sums had\n"
"two NaN operands: their payload is numpy's choice, which differs between its SIMD lanes\n"
"and its loop tails, so the caller decodes such a record with numpy (files written before\n"
"the writer listed every NaN sum as an exception rely on that choice).");

/* dtypes.from_wide, NaN rule included (the tau codec's encoder used it). */
static inline uint16_t bf16_from_wide(float value)
{
    uint32_t u;
    memcpy(&u, &value, 4);
    uint32_t rounded = (u + (0x7FFFu + ((u >> 16) & 1u))) >> 16, quiet = (u >> 16) | 0x0040u;
    /* the NaN test on the bits and a select (no branch): loops using this vectorize */
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet : rounded);
}

static inline uint16_t f16_from_wide(float value)
{
    uint32_t u;
    memcpy(&u, &value, 4);
    if (value != value)
        return (uint16_t)(((u >> 16) & 0x8000u) | 0x7E00u | ((u >> 13) & 0x03FFu));
    return f16_round(value);
}

/* a + b with numpy's NaN: x86 and Arm return the first operand's NaN (quieted) when it is
 * one, else the second's; the compiler may swap the operands of a commutative +, so the
 * choice is spelled out.  (A NaN from two non-NaNs, inf - inf, is the hardware's.) */
#define DEFINE_ADD_FIRST_NAN(NAME, WIDE, WIDE_BITS, QUIET_BIT)                               \
    static inline WIDE NAME(WIDE a, WIDE b)                                                 \
    {                                                                                       \
        WIDE sum = a + b, quieted;                                                          \
        WIDE_BITS a_bits, b_bits;                                                           \
        memcpy(&a_bits, &a, sizeof a_bits);                                                 \
        memcpy(&b_bits, &b, sizeof b_bits);                                                 \
        /* selects, not branches: loops using this vectorize */                             \
        WIDE_BITS nan_bits = (a != a ? a_bits : b_bits) | QUIET_BIT;                        \
        memcpy(&quieted, &nan_bits, sizeof quieted);                                        \
        return (sum == sum) | ((a == a) & (b == b)) ? sum : quieted;                        \
    }

DEFINE_ADD_FIRST_NAN(add_f32, float, uint32_t, 0x00400000u)
DEFINE_ADD_FIRST_NAN(add_f64, double, uint64_t, 0x0008000000000000ull)

#define DEFINE_TAU_DECODE(NAME, BITS, WIDE, WIDE_BITS, TO_WIDE, FROM_WIDE, ADD)              \
    static Py_ssize_t NAME(const uint8_t *restrict planes, const BITS *restrict base,       \
                           BITS *restrict out, Py_ssize_t n)                                \
    {                                                                                       \
        Py_ssize_t both_nan = 0;                                                            \
        for (Py_ssize_t i = 0; i < n; i++) {                                                \
            WIDE_BITS tau_bits;                                                             \
            FROM_PLANES(WIDE_BITS, planes, n, i, tau_bits);                                 \
            WIDE tau, wide_base = TO_WIDE(base[i]);                                         \
            memcpy(&tau, &tau_bits, sizeof tau);                                            \
            both_nan += tau != tau && wide_base != wide_base;                               \
            out[i] = FROM_WIDE(ADD(wide_base, tau));                                        \
        }                                                                                   \
        return both_nan;                                                                    \
    }

DEFINE_TAU_DECODE(tau_bf16, uint16_t, float, uint32_t, bf16_wide, bf16_from_wide, add_f32)
DEFINE_TAU_DECODE(tau_f16, uint16_t, float, uint32_t, f16_wide, f16_from_wide, add_f32)
DEFINE_TAU_DECODE(tau_f32, uint32_t, float, uint32_t, f32_wide, f32_round, add_f32)
DEFINE_TAU_DECODE(tau_f64, uint64_t, double, uint64_t, f64_wide, f64_round, add_f64)

static PyObject *tau_decode(PyObject *self, PyObject *args)
{
    int kind;
    PyObject *planes_object, *base_object, *out_object;
    if (!PyArg_ParseTuple(args, "iOOO", &kind, &planes_object, &base_object, &out_object))
        return NULL;
    if (!known_kind(kind))
        return NULL;
    Py_ssize_t itemsize = KIND_ITEMSIZE[kind], wide_size = kind == KIND_F64 ? 8 : 4;
    Py_buffer planes = {0}, base = {0}, out = {0};
    PyObject *result = NULL;
    if (PyObject_GetBuffer(planes_object, &planes, PyBUF_CONTIG_RO) < 0 ||
        get_buffer(base_object, &base, 0, itemsize, "base bits") < 0 ||
        get_buffer(out_object, &out, 1, itemsize, "out") < 0)
        goto done;
    Py_ssize_t n = out.len / itemsize;
    if (base.len / itemsize != n || planes.len != n * wide_size) {
        PyErr_SetString(PyExc_ValueError, "planes, base bits and out differ in length");
        goto done;
    }
    Py_ssize_t both_nan;
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case KIND_BF16: both_nan = tau_bf16(planes.buf, base.buf, out.buf, n); break;
    case KIND_F16: both_nan = tau_f16(planes.buf, base.buf, out.buf, n); break;
    case KIND_F32: both_nan = tau_f32(planes.buf, base.buf, out.buf, n); break;
    default: both_nan = tau_f64(planes.buf, base.buf, out.buf, n);
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(both_nan);
done:
    release(&planes);
    release(&base);
    release(&out);
    return result;
}

PyDoc_STRVAR(quant_assign_doc,
"quant_assign(kind, bits, size, kept, base, a, b, codes, overflowed) -> (error_sq, max_abs)\n"
"\n"
"codecs.quant._assign_and_measure: each regular value's level with its group's stored\n"
"scales (``a``, ``b``: the wide values, as float64, one per group of ``size``), its sign and\n"
"level packed into ``codes`` (zeroed; ``bits`` per value, little-endian), whether its\n"
"restored value overflows (``overflowed``, uint8), and the squared error of the restored\n"
"values summed in order over the finite ones, with the largest absolute error.");

/* Values a chunk of quant_assign handles at once: its first loop (levels and restored values,
 * no dependency between values: vectorized) fills small buffers that its second loop (the
 * error summed in order, the codes packed) reads back. */
#define QUANT_CHUNK 256

#define DEFINE_QUANT_ASSIGN(NAME, BITS, WIDE, TO_WIDE, FROM_WIDE, RINT, ABS)                   \
    VECTOR_CLONES static void NAME(const BITS *restrict kept, const BITS *restrict base,     \
                     const double *restrict a, const double *restrict b, Py_ssize_t n,        \
                     Py_ssize_t size, int bits, uint8_t *restrict codes,                      \
                     uint8_t *restrict overflowed, double *error_sq, double *max_abs)         \
    {                                                                                        \
        const WIDE top = (WIDE)((1 << (bits - 1)) - 1);                                      \
        double sum = 0.0, largest = 0.0;  /* 0 + the first square is that square */          \
        uint64_t pending = 0;             /* code bits not yet written, from bit 0 */        \
        int filled = 0;                                                                      \
        uint8_t *out = codes;                                                                \
        uint8_t code[QUANT_CHUNK];                                                           \
        WIDE restored[QUANT_CHUNK];                                                          \
        for (Py_ssize_t first = 0, g = 0; first < n; first += size, g++) {                   \
            Py_ssize_t group_end = n - first < size ? n : first + size;                      \
            const WIDE A = (WIDE)a[g], B = (WIDE)b[g];                                       \
            const WIDE limit = B > 0 ? top : 0;                                              \
            for (Py_ssize_t at = first; at < group_end; at += QUANT_CHUNK) {                 \
                int m = (int)(group_end - at < QUANT_CHUNK ? group_end - at : QUANT_CHUNK);  \
                const BITS *k = kept + at, *o = base + at;                                   \
                for (int j = 0; j < m; j++) {                                                \
                    WIDE tune = TO_WIDE(k[j]), wide_base = TO_WIDE(o[j]);                    \
                    WIDE tau = tune - wide_base;                                             \
                    int negative = signbit(tau) != 0;                                        \
                    /* selects, not branches, so that the loop vectorizes: NaN and below 0   \
                     * give 0, above the limit the limit (0 without a positive step) */      \
                    WIDE level = RINT((ABS(tau) - A) / B);                                   \
                    level = level >= 0 ? level : 0;                                          \
                    level = level > limit ? limit : level;                                   \
                    int ilevel = (int)level;  /* 0 .. top: through int, not unsigned */      \
                    WIDE magnitude = A + B * (WIDE)ilevel;                                   \
                    WIDE value = wide_base + (negative ? -magnitude : magnitude);            \
                    restored[j] = TO_WIDE(FROM_WIDE(value));                                 \
                    code[j] = (uint8_t)(negative | (ilevel << 1));                           \
                }                                                                            \
                for (int j = 0; j < m; j++) {                                                \
                    double wide = (double)restored[j];                                       \
                    double error = wide - (double)TO_WIDE(k[j]);                             \
                    overflowed[at + j] = !isfinite(wide);                                    \
                    if (isfinite(error)) {                                                   \
                        sum += error * error;                                                \
                        if (fabs(error) > largest) largest = fabs(error);                    \
                    }                                                                        \
                    pending |= (uint64_t)code[j] << filled;                                  \
                    filled += bits;                                                          \
                    if (filled >= 8) {                                                       \
                        *out++ = (uint8_t)pending;                                           \
                        pending >>= 8;                                                       \
                        filled -= 8;                                                         \
                    }                                                                        \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        if (filled > 0)                                                                      \
            *out = (uint8_t)pending;                                                         \
        *error_sq = sum;                                                                     \
        *max_abs = largest;                                                                  \
    }

DEFINE_QUANT_ASSIGN(quant_assign_bf16, uint16_t, float, bf16_wide, bf16_from_wide, rintf, fabsf)
DEFINE_QUANT_ASSIGN(quant_assign_f16, uint16_t, float, f16_wide, f16_from_wide, rintf, fabsf)
DEFINE_QUANT_ASSIGN(quant_assign_f32, uint32_t, float, f32_wide, f32_round, rintf, fabsf)
DEFINE_QUANT_ASSIGN(quant_assign_f64, uint64_t, double, f64_wide, f64_round, rint, fabs)

static PyObject *quant_assign(PyObject *self, PyObject *args)
{
    int kind, bits;
    Py_ssize_t size;
    PyObject *kept_object, *base_object, *a_object, *b_object, *codes_object, *over_object;
    if (!PyArg_ParseTuple(args, "iinOOOOOO", &kind, &bits, &size, &kept_object, &base_object,
                          &a_object, &b_object, &codes_object, &over_object))
        return NULL;
    if (!known_kind(kind))
        return NULL;
    if (bits < 1 || bits > 8 || size < 1)
        return PyErr_Format(PyExc_ValueError, "bad quant_assign arguments");
    Py_ssize_t itemsize = KIND_ITEMSIZE[kind];
    Py_buffer kept = {0}, base = {0}, a = {0}, b = {0}, codes = {0}, over = {0};
    PyObject *result = NULL;
    if (get_buffer(kept_object, &kept, 0, itemsize, "kept bits") < 0 ||
        get_buffer(base_object, &base, 0, itemsize, "base bits") < 0 ||
        get_buffer(a_object, &a, 0, 8, "a") < 0 || get_buffer(b_object, &b, 0, 8, "b") < 0 ||
        get_buffer(codes_object, &codes, 1, 1, "codes") < 0 ||
        get_buffer(over_object, &over, 1, 1, "overflowed") < 0)
        goto done;
    Py_ssize_t n = kept.len / itemsize, groups = n ? (n + size - 1) / size : 0;
    if (base.len / itemsize != n || over.len != n || a.len / 8 < groups || b.len / 8 < groups ||
        codes.len < (n * bits + 7) / 8) {
        PyErr_SetString(PyExc_ValueError, "quant_assign buffers differ in length");
        goto done;
    }
    double error_sq = 0.0, max_abs = 0.0;
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case KIND_BF16: quant_assign_bf16(kept.buf, base.buf, a.buf, b.buf, n, size, bits, codes.buf, over.buf, &error_sq, &max_abs); break;
    case KIND_F16: quant_assign_f16(kept.buf, base.buf, a.buf, b.buf, n, size, bits, codes.buf, over.buf, &error_sq, &max_abs); break;
    case KIND_F32: quant_assign_f32(kept.buf, base.buf, a.buf, b.buf, n, size, bits, codes.buf, over.buf, &error_sq, &max_abs); break;
    default: quant_assign_f64(kept.buf, base.buf, a.buf, b.buf, n, size, bits, codes.buf, over.buf, &error_sq, &max_abs); break;
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("dd", error_sq, max_abs);
done:
    release(&kept);
    release(&base);
    release(&a);
    release(&b);
    release(&codes);
    release(&over);
    return result;
}

PyDoc_STRVAR(quant_restore_doc,
"quant_restore(kind, bits, size, skip, codes, bit, a, b, base, out)\n"
"\n"
"codecs.quant's regular values restored (the decoder's arithmetic, numpy's NaN rule): value\n"
"i's code is the ``bits`` bits of ``codes`` from bit ``bit + i * bits`` (sign, then level,\n"
"little-endian); its group is ``(skip + i) // size``, whose stored scales ``a`` and ``b`` are\n"
"in the wide type (float32; float64 for F64); ``out[i]`` = base[i] + (-1)^sign * (a + b *\n"
"level), rounded to the dtype.");

#define DEFINE_QUANT_RESTORE(NAME, BITS, WIDE, TO_WIDE, FROM_WIDE, ADD)                       \
    VECTOR_CLONES static void NAME(const uint8_t *restrict codes, uint64_t bit, int bits,    \
                     Py_ssize_t size, Py_ssize_t skip, const WIDE *restrict a,               \
                     const WIDE *restrict b, const BITS *restrict base, BITS *restrict out,  \
                     Py_ssize_t n)                                                           \
    {                                                                                        \
        const unsigned mask = (1u << bits) - 1u;                                             \
        uint8_t code[QUANT_CHUNK];                                                           \
        Py_ssize_t g = 0, left = size - skip; /* values left in group g */                   \
        for (Py_ssize_t i = 0; i < n;) {                                                     \
            if (left == 0) {                                                                 \
                g++;                                                                         \
                left = size;                                                                 \
            }                                                                                \
            /* a chunk within group g: its codes unpacked, then restored without branches */ \
            int m = (int)(n - i < left ? n - i : left);                                      \
            if (m > QUANT_CHUNK)                                                             \
                m = QUANT_CHUNK;                                                             \
            for (int j = 0; j < m; j++, bit += (uint64_t)bits) {                             \
                uint64_t byte = bit >> 3;                                                    \
                unsigned shift = (unsigned)(bit & 7u), window = codes[byte];                 \
                if (shift + (unsigned)bits > 8u)                                             \
                    window |= (unsigned)codes[byte + 1] << 8;                                \
                code[j] = (uint8_t)((window >> shift) & mask);                               \
            }                                                                                \
            const WIDE A = a[g], B = b[g];                                                   \
            const BITS *o = base + i;                                                        \
            BITS *restrict w = out + i;                                                      \
            for (int j = 0; j < m; j++) {                                                    \
                WIDE magnitude = ADD(A, B * (WIDE)(code[j] >> 1));                           \
                w[j] = FROM_WIDE(ADD(TO_WIDE(o[j]), (code[j] & 1u) ? -magnitude : magnitude)); \
            }                                                                                \
            i += m;                                                                          \
            left -= m;                                                                       \
        }                                                                                    \
    }

DEFINE_QUANT_RESTORE(quant_restore_bf16, uint16_t, float, bf16_wide, bf16_from_wide, add_f32)
DEFINE_QUANT_RESTORE(quant_restore_f16, uint16_t, float, f16_wide, f16_from_wide, add_f32)
DEFINE_QUANT_RESTORE(quant_restore_f32, uint32_t, float, f32_wide, f32_round, add_f32)
DEFINE_QUANT_RESTORE(quant_restore_f64, uint64_t, double, f64_wide, f64_round, add_f64)

static PyObject *quant_restore(PyObject *self, PyObject *args)
{
    int kind, bits;
    Py_ssize_t size, skip;
    unsigned long long bit;
    PyObject *codes_object, *a_object, *b_object, *base_object, *out_object;
    if (!PyArg_ParseTuple(args, "iinnOKOOOO", &kind, &bits, &size, &skip, &codes_object, &bit,
                          &a_object, &b_object, &base_object, &out_object))
        return NULL;
    if (!known_kind(kind))
        return NULL;
    if (bits < 1 || bits > 8 || size < 1 || skip < 0 || skip >= size)
        return PyErr_Format(PyExc_ValueError, "bad quant_restore arguments");
    Py_ssize_t itemsize = KIND_ITEMSIZE[kind], wide_size = kind == KIND_F64 ? 8 : 4;
    Py_buffer codes = {0}, a = {0}, b = {0}, base = {0}, out = {0};
    PyObject *result = NULL;
    if (get_buffer(codes_object, &codes, 0, 1, "codes") < 0 ||
        get_buffer(a_object, &a, 0, wide_size, "a") < 0 ||
        get_buffer(b_object, &b, 0, wide_size, "b") < 0 ||
        get_buffer(base_object, &base, 0, itemsize, "base bits") < 0 ||
        get_buffer(out_object, &out, 1, itemsize, "out") < 0)
        goto done;
    Py_ssize_t n = out.len / itemsize, groups = n ? (skip + n - 1) / size + 1 : 0;
    if (base.len / itemsize != n || a.len / wide_size < groups || b.len / wide_size < groups ||
        (unsigned long long)codes.len * 8u < bit + (unsigned long long)n * (unsigned)bits) {
        PyErr_SetString(PyExc_ValueError, "quant_restore buffers differ in length");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case KIND_BF16: quant_restore_bf16(codes.buf, bit, bits, size, skip, a.buf, b.buf, base.buf, out.buf, n); break;
    case KIND_F16: quant_restore_f16(codes.buf, bit, bits, size, skip, a.buf, b.buf, base.buf, out.buf, n); break;
    case KIND_F32: quant_restore_f32(codes.buf, bit, bits, size, skip, a.buf, b.buf, base.buf, out.buf, n); break;
    default: quant_restore_f64(codes.buf, bit, bits, size, skip, a.buf, b.buf, base.buf, out.buf, n); break;
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&codes);
    release(&a);
    release(&b);
    release(&base);
    release(&out);
    return result;
}

PyDoc_STRVAR(ulp_encode_doc,
"ulp_encode(kind, kept, base, planes)\n"
"\n"
"The ``ulp`` value codec's raw stream into ``planes`` (itemsize x n bytes): the zigzagged\n"
"order-key distance of every kept value from its base value, in the stored order (stably\n"
"sorted by the base's exponent field: a counting sort, no index array), as byte planes --\n"
"what codecs/ulp.py builds with numpy, byte for byte.  ``kind`` as for merge_block.");

#define DEFINE_ULP_ENCODE(NAME, BITS, MANT, EBITS)                                           \
    static void NAME(const BITS *restrict kept, const BITS *restrict base,                  \
                     uint8_t *restrict planes, Py_ssize_t n, Py_ssize_t *restrict slots)    \
    {                                                                                       \
        const BITS top = (BITS)1 << (8 * sizeof(BITS) - 1);                                 \
        const BITS emask = (BITS)((1u << (EBITS)) - 1u);                                    \
        for (Py_ssize_t i = 0; i < n; i++)                                                  \
            slots[(base[i] >> (MANT)) & emask]++;                                           \
        Py_ssize_t at = 0;                                                                  \
        for (Py_ssize_t e = 0; e < ((Py_ssize_t)1 << (EBITS)); e++) {                       \
            Py_ssize_t count = slots[e];                                                    \
            slots[e] = at;                                                                  \
            at += count;                                                                    \
        }                                                                                   \
        for (Py_ssize_t i = 0; i < n; i++) {                                                \
            BITS b = base[i], k = kept[i];                                                  \
            BITS bkey = (BITS)(b ^ (((BITS)0 - (BITS)(b >> (8 * sizeof(BITS) - 1))) | top)); \
            BITS kkey = (BITS)(k ^ (((BITS)0 - (BITS)(k >> (8 * sizeof(BITS) - 1))) | top)); \
            BITS d = (BITS)(kkey - bkey);                                                   \
            BITS z = (BITS)((BITS)(d << 1) ^ ((BITS)0 - (BITS)(d >> (8 * sizeof(BITS) - 1)))); \
            Py_ssize_t j = slots[(b >> (MANT)) & emask]++;                                  \
            for (size_t p = 0; p < sizeof(BITS); p++)                                       \
                planes[(Py_ssize_t)p * n + j] = (uint8_t)(z >> (8 * p));                    \
        }                                                                                   \
    }

DEFINE_ULP_ENCODE(ulp_encode_bf16, uint16_t, 7, 8)
DEFINE_ULP_ENCODE(ulp_encode_f16, uint16_t, 10, 5)
DEFINE_ULP_ENCODE(ulp_encode_f32, uint32_t, 23, 8)
DEFINE_ULP_ENCODE(ulp_encode_f64, uint64_t, 52, 11)

static PyObject *ulp_encode(PyObject *self, PyObject *args)
{
    int kind;
    PyObject *kept_object, *base_object, *planes_object;
    if (!PyArg_ParseTuple(args, "iOOO", &kind, &kept_object, &base_object, &planes_object))
        return NULL;
    if (!known_kind(kind))
        return NULL;
    Py_ssize_t itemsize = KIND_ITEMSIZE[kind];
    Py_buffer kept = {0}, base = {0}, planes = {0};
    PyObject *result = NULL;
    Py_ssize_t *slots = NULL;
    if (get_buffer(kept_object, &kept, 0, itemsize, "kept bits") < 0 ||
        get_buffer(base_object, &base, 0, itemsize, "base bits") < 0 ||
        get_buffer(planes_object, &planes, 1, 1, "planes") < 0)
        goto done;
    Py_ssize_t n = kept.len / itemsize;
    if (base.len / itemsize != n || planes.len != n * itemsize) {
        PyErr_SetString(PyExc_ValueError, "kept bits, base bits and planes differ in length");
        goto done;
    }
    slots = PyMem_Calloc((size_t)1 << 11, sizeof(Py_ssize_t));
    if (slots == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case KIND_BF16: ulp_encode_bf16(kept.buf, base.buf, planes.buf, n, slots); break;
    case KIND_F16: ulp_encode_f16(kept.buf, base.buf, planes.buf, n, slots); break;
    case KIND_F32: ulp_encode_f32(kept.buf, base.buf, planes.buf, n, slots); break;
    default: ulp_encode_f64(kept.buf, base.buf, planes.buf, n, slots); break;
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(slots);
    release(&kept);
    release(&base);
    release(&planes);
    return result;
}

PyDoc_STRVAR(ulp_decode_doc,
"ulp_decode(kind, planes, base, out, first=None, limit=None)\n"
"\n"
"The ``ulp`` value codec's decoder into ``out``: the zigzagged order-key distances are\n"
"read from ``planes`` (byte planes, stored sorted by the base's exponent field, stably),\n"
"put back in kept order with a counting sort and added to the base's order keys, as\n"
"codecs/ulp.py does with numpy.  ``kind`` as for merge_block.  With ``first`` and\n"
"``limit`` (int64, one entry per exponent field value) ``base`` and ``out`` are a run of\n"
"the kept values: its first value of exponent e is at slot first[e] of the planes, and\n"
"every slot of exponent e must lie below limit[e] (else ValueError: another base).");

/* Counting sort by the exponent field: slots[e] = where the next value of exponent e is
 * stored (from the run's own histogram, or given), stable by construction. */
#define DEFINE_ULP_DECODE(NAME, BITS, MANT, EBITS)                                           \
    VECTOR_CLONES static void NAME##_keys(const BITS *restrict base, BITS *restrict out,    \
                                          Py_ssize_t n)                                     \
    {                                                                                       \
        const BITS top = (BITS)1 << (8 * sizeof(BITS) - 1);                                 \
        for (Py_ssize_t i = 0; i < n; i++) {                                                \
            BITS b = base[i], z = out[i];                                                   \
            BITS distance = (BITS)((z >> 1) ^ ((BITS)0 - (z & 1u)));                        \
            BITS key = (BITS)(b ^ (((BITS)0 - (BITS)(b >> (8 * sizeof(BITS) - 1))) | top)); \
            key = (BITS)(key + distance);                                                   \
            out[i] = (BITS)(key ^ (((BITS)0 - (BITS)((key >> (8 * sizeof(BITS) - 1)) ^ 1u)) \
                                   | top));                                                 \
        }                                                                                   \
    }                                                                                       \
    static int NAME(const uint8_t *restrict planes, Py_ssize_t stride,                      \
                    const BITS *restrict base, BITS *restrict out, Py_ssize_t n,            \
                    Py_ssize_t *restrict slots, const int64_t *first, const int64_t *limit) \
    {                                                                                       \
        const BITS emask = (BITS)((1u << (EBITS)) - 1u);                                    \
        const Py_ssize_t fields = (Py_ssize_t)1 << (EBITS);                                 \
        if (first == NULL) {  /* four histograms: four chains of increments, not one */      \
            Py_ssize_t *restrict tables = slots + fields, i = 0;                            \
            for (; i + 4 <= n; i += 4)                                                      \
                for (int t = 0; t < 4; t++)                                                 \
                    tables[t * fields + ((base[i + t] >> (MANT)) & emask)]++;               \
            for (; i < n; i++)                                                              \
                tables[(base[i] >> (MANT)) & emask]++;                                      \
            for (Py_ssize_t e = 0; e < fields; e++)                                         \
                slots[e] = tables[e] + tables[fields + e] + tables[2 * fields + e]          \
                           + tables[3 * fields + e];                                        \
            Py_ssize_t at = 0;                                                              \
            for (Py_ssize_t e = 0; e < fields; e++) {                                       \
                Py_ssize_t count = slots[e];                                                \
                slots[e] = at;                                                              \
                at += count;                                                                \
            }                                                                               \
        } else {                                                                            \
            for (Py_ssize_t e = 0; e < fields; e++)                                         \
                slots[e] = (Py_ssize_t)first[e];                                            \
        }                                                                                   \
        /* the zigzagged distances put back in kept order, then (vectorized) onto the keys */ \
        for (Py_ssize_t i = 0; i < n; i++) {                                                \
            Py_ssize_t e = (Py_ssize_t)((base[i] >> (MANT)) & emask);                       \
            Py_ssize_t j = slots[e]++;                                                      \
            if (limit != NULL && (j < 0 || j >= (Py_ssize_t)limit[e] || j >= stride))       \
                return -1;                                                                  \
            FROM_PLANES(BITS, planes, stride, j, out[i]);                                   \
        }                                                                                   \
        NAME##_keys(base, out, n);                                                          \
        return 0;                                                                           \
    }

DEFINE_ULP_DECODE(ulp_bf16, uint16_t, 7, 8)
DEFINE_ULP_DECODE(ulp_f16, uint16_t, 10, 5)
DEFINE_ULP_DECODE(ulp_f32, uint32_t, 23, 8)
DEFINE_ULP_DECODE(ulp_f64, uint64_t, 52, 11)

static PyObject *ulp_decode(PyObject *self, PyObject *args)
{
    int kind;
    PyObject *planes_object, *base_object, *out_object;
    PyObject *first_object = Py_None, *limit_object = Py_None;
    if (!PyArg_ParseTuple(args, "iOOO|OO", &kind, &planes_object, &base_object, &out_object,
                          &first_object, &limit_object))
        return NULL;
    if (!known_kind(kind))
        return NULL;
    static const int EXPONENT_BITS[] = {8, 5, 8, 11};  /* by kind: BF16, F16, F32, F64 */
    Py_ssize_t itemsize = KIND_ITEMSIZE[kind];
    Py_ssize_t fields = (Py_ssize_t)1 << EXPONENT_BITS[kind - KIND_BF16];
    Py_buffer planes = {0}, base = {0}, out = {0}, first = {0}, limit = {0};
    PyObject *result = NULL;
    Py_ssize_t *slots = NULL;
    int failed = 0;
    if (PyObject_GetBuffer(planes_object, &planes, PyBUF_CONTIG_RO) < 0 ||
        get_buffer(base_object, &base, 0, itemsize, "base bits") < 0 ||
        get_buffer(out_object, &out, 1, itemsize, "out") < 0)
        goto done;
    if ((first_object == Py_None) != (limit_object == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "first and limit go together");
        goto done;
    }
    if (first_object != Py_None &&
        (get_buffer(first_object, &first, 0, 8, "first") < 0 ||
         get_buffer(limit_object, &limit, 0, 8, "limit") < 0))
        goto done;
    if (first_object != Py_None && (first.len != fields * 8 || limit.len != fields * 8)) {
        PyErr_SetString(PyExc_ValueError, "first and limit need one entry per exponent");
        goto done;
    }
    Py_ssize_t n = out.len / itemsize;
    Py_ssize_t stride = planes.len / itemsize;
    if (base.len / itemsize != n || planes.len != stride * itemsize ||
        (first_object == Py_None && stride != n)) {
        PyErr_SetString(PyExc_ValueError, "planes, base bits and out differ in length");
        goto done;
    }
    slots = PyMem_Calloc((size_t)5 << 11, sizeof(Py_ssize_t));  /* a table, four histograms */
    if (slots == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const int64_t *first_p = first_object == Py_None ? NULL : first.buf;
    const int64_t *limit_p = first_object == Py_None ? NULL : limit.buf;
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case KIND_BF16: failed = ulp_bf16(planes.buf, stride, base.buf, out.buf, n, slots, first_p, limit_p); break;
    case KIND_F16: failed = ulp_f16(planes.buf, stride, base.buf, out.buf, n, slots, first_p, limit_p); break;
    case KIND_F32: failed = ulp_f32(planes.buf, stride, base.buf, out.buf, n, slots, first_p, limit_p); break;
    default: failed = ulp_f64(planes.buf, stride, base.buf, out.buf, n, slots, first_p, limit_p);
    }
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_SetString(PyExc_ValueError, "ulp: a slot outside its exponent's range");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(slots);
    release(&planes);
    release(&base);
    release(&out);
    release(&first);
    release(&limit);
    return result;
}

PyDoc_STRVAR(rice_encode_doc,
"rice_encode(values, k, unary, remainders)\n"
"\n"
"codecs.rice.encode of uint64 ``values`` into zeroed uint8 ``unary`` (sized for\n"
"sum((v >> k) + 1) bits) and ``remainders`` (len(values) * k bits), bits little-endian.");

static PyObject *rice_encode(PyObject *self, PyObject *args)
{
    PyObject *values_object, *unary_object, *remainders_object;
    unsigned int k;
    if (!PyArg_ParseTuple(args, "OIOO", &values_object, &k, &unary_object, &remainders_object))
        return NULL;
    if (k > 32)
        return PyErr_Format(PyExc_ValueError, "rice parameter %u is over 32", k);
    Py_buffer values = {0}, unary = {0}, remainders = {0};
    PyObject *result = NULL;
    if (get_buffer(values_object, &values, 0, 8, "values") < 0 ||
        get_buffer(unary_object, &unary, 1, 1, "unary") < 0 ||
        get_buffer(remainders_object, &remainders, 1, 1, "remainders") < 0)
        goto done;
    Py_ssize_t n = values.len / 8;
    const uint64_t *v = values.buf;
    uint64_t unary_bits = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t quotient = (v[i] >> k) + 1;
        if (unary_bits + quotient < unary_bits) {  /* cannot happen for real positions */
            PyErr_SetString(PyExc_OverflowError, "the unary code would exceed 2^64 bits");
            goto done;
        }
        unary_bits += quotient;
    }
    if ((uint64_t)unary.len < (unary_bits + 7) / 8 ||
        (uint64_t)remainders.len < ((uint64_t)n * k + 7) / 8) {
        PyErr_SetString(PyExc_ValueError, "unary or remainders is too short");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    uint8_t *u = unary.buf, *r = remainders.buf;
    uint64_t end = (uint64_t)-1, at = 0;
    uint64_t mask = k ? (((uint64_t)1 << k) - 1) : 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        end += (v[i] >> k) + 1;
        u[end >> 3] |= (uint8_t)(1u << (end & 7));
        if (k) {
            uint64_t bits = v[i] & mask;
            for (unsigned written = 0; written < k;) {  /* at most 5 bytes of a 32-bit field */
                unsigned shift = (unsigned)(at & 7), take = 8 - shift;
                if (take > k - written)
                    take = k - written;
                r[at >> 3] |= (uint8_t)(((bits >> written) & ((1u << take) - 1)) << shift);
                written += take;
                at += take;
            }
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&values);
    release(&unary);
    release(&remainders);
    return result;
}

/* ---- ranking keys for top-k (localize/topk.py, compress.py) ----------------------- */

PyDoc_STRVAR(quant_fit_doc,
"quant_fit(magnitude, size, bits, rounds, offsets, steps)\n"
"\n"
"codecs.quant._fit: per group of ``size`` float64 magnitudes (the last may be shorter), the\n"
"offset and step of ``bits``-bit levels, by ``rounds`` rounds of level assignment and least\n"
"squares from the group's range; every sum taken in order, as _fit_numpy's cumsum does.");

/* rint(t) clipped to the levels 0..top (0 for NaN: nan_to_num, then clip). */
static inline double clipped_level(double t, double top)
{
    double level = rint(t);
    if (level != level)
        return 0.0;
    if (level < 0)
        level = 0;
    if (level > top)
        level = top;
    return (double)(uint8_t)level;
}

static inline double quant_level(double x, double offset, double step, double top)
{
    if (!(step > 0))
        return 0.0;
    return clipped_level((x - offset) / step, top);
}

static inline double max_zero(double v)  /* np.maximum(v, 0.0): v when v >= 0 or NaN */
{
    return (v >= 0.0 || v != v) ? v : 0.0;
}

/* One round's levels of a group, exactly as quant_level gives them, into ``fresh``; ``old``
 * holds the last round's (``*moved`` != 0 where one differs); returns the integer sums of the
 * levels and of their squares through ``s_l``, ``s_ll``. */
VECTOR_CLONES static void assign_levels(const double *restrict x, Py_ssize_t n, double offset,
                                        double step, double top, const uint8_t *restrict old,
                                        uint8_t *restrict fresh, int64_t *s_l_out,
                                        int64_t *s_ll_out, unsigned *moved_out)
{
    int64_t s_l = 0, s_ll = 0;
    unsigned moved = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t l = (uint8_t)quant_level(x[i], offset, step, top);
        moved |= (unsigned)(old[i] ^ l);
        fresh[i] = l;
        s_l += l;
        s_ll += (int64_t)l * l;
    }
    *s_l_out = s_l;
    *s_ll_out = s_ll;
    *moved_out = moved;
}

/* assign_levels with a multiplication by the step's reciprocal in place of a division (a
 * division a value is most of a round's time), four values a step with AVX2.  The product t
 * and the rounded quotient q differ by at most 3 units in the last place of
 * |x - offset| / step; rint(t) == rint(q) unless a half-integer lies within that distance of
 * t, so any t in the levels' range (|t| < 1024: levels are at most 127, and beyond that range
 * both clip alike) within 2^-36 of a half-integer makes the round "unsure" (returns 1;
 * ``fresh`` and the sums are then not to be used) and the caller assigns it again with the
 * division.  The sums of levels and of their squares are taken in double (integers below
 * 2^53: exact in any order); the last n % 4 values by assign_levels.  ``inv`` must be a
 * normal, finite 1 / step of a step > 0.  Without AVX2 every round is "unsure". */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
__attribute__((target("avx2")))
static int assign_levels_fast(const double *restrict x, Py_ssize_t n, double offset,
                              double step, double inv, double top, const uint8_t *restrict old,
                              uint8_t *restrict fresh, int64_t *s_l_out, int64_t *s_ll_out,
                              unsigned *moved_out)
{
    if (!cpu_has_avx2)
        return 1;
    const __m256d off = _mm256_set1_pd(offset), scale = _mm256_set1_pd(inv),
        ceiling = _mm256_set1_pd(top), zero = _mm256_setzero_pd(),
        range = _mm256_set1_pd(1024.0), half = _mm256_set1_pd(0.5),
        near = _mm256_set1_pd(0x1p-36), sign = _mm256_set1_pd(-0.0);
    __m256d s_l = zero, s_ll = zero, unsure = zero;
    uint32_t moved = 0;
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m256d t = _mm256_mul_pd(_mm256_sub_pd(_mm256_loadu_pd(x + i), off), scale);
        __m256d r = _mm256_round_pd(t, _MM_FROUND_CUR_DIRECTION);
        __m256d from_half = _mm256_andnot_pd(sign, _mm256_sub_pd(
            _mm256_andnot_pd(sign, _mm256_sub_pd(t, r)), half));
        unsure = _mm256_or_pd(unsure, _mm256_and_pd(
            _mm256_cmp_pd(_mm256_andnot_pd(sign, t), range, _CMP_LT_OQ),
            _mm256_cmp_pd(from_half, near, _CMP_LT_OQ)));
        /* NaN to 0 (max returns its second operand when one is NaN), then at most top */
        __m256d level = _mm256_min_pd(_mm256_max_pd(r, zero), ceiling);
        s_l = _mm256_add_pd(s_l, level);
        s_ll = _mm256_add_pd(s_ll, _mm256_mul_pd(level, level));
        __m128i words = _mm256_cvttpd_epi32(level);
        __m128i bytes = _mm_packus_epi16(_mm_packus_epi32(words, words), words);
        uint32_t four = (uint32_t)_mm_cvtsi128_si32(bytes), before;
        memcpy(&before, old + i, 4);
        moved |= before ^ four;
        memcpy(fresh + i, &four, 4);
    }
    if (_mm256_movemask_pd(unsure))
        return 1;
    int64_t tail_l, tail_ll;
    unsigned tail_moved;
    assign_levels(x + i, n - i, offset, step, top, old + i, fresh + i, &tail_l, &tail_ll,
                  &tail_moved);
    double lanes_l[4], lanes_ll[4];
    _mm256_storeu_pd(lanes_l, s_l);
    _mm256_storeu_pd(lanes_ll, s_ll);
    *s_l_out = tail_l;
    *s_ll_out = tail_ll;
    for (int lane = 0; lane < 4; lane++) {
        *s_l_out += (int64_t)lanes_l[lane];
        *s_ll_out += (int64_t)lanes_ll[lane];
    }
    *moved_out = (moved | tail_moved) != 0;
    return 0;
}
#else
static int assign_levels_fast(const double *x, Py_ssize_t n, double offset, double step,
                              double inv, double top, const uint8_t *old, uint8_t *fresh,
                              int64_t *s_l_out, int64_t *s_ll_out, unsigned *moved_out)
{
    return 1;
}
#endif

/* Groups fitted side by side: each group's floating-point sums are still taken value by
 * value in order (the bits of a group fitted alone, as _fit_numpy fits it), but the chains of
 * FIT_LANES groups are interleaved, so their additions' latencies overlap. */
#define FIT_LANES 8
/* Groups larger than this are fitted one at a time (their scratch, 2 bytes a value, and
 * magnitudes, 8, not multiplied by the lanes). */
#define FIT_LANES_UP_TO 4096

/* Fit ``lanes`` (1..FIT_LANES) groups of ``n`` values each, ``x[j]`` the magnitudes of group
 * j (x[j] for j >= lanes: any valid group, computed and dropped); ``scratch`` holds
 * 2 * lanes * n bytes.  For each group: from its range, ``rounds`` rounds of level
 * assignment then least squares of the magnitudes on the levels, until the levels stop
 * moving (the same sums again would give the same scales, bit for bit). */
VECTOR_CLONES static void fit_lanes(const double *const *x, Py_ssize_t n, int lanes, int bits,
                                    int rounds, uint8_t *scratch, double *offset_out,
                                    double *step_out)
{
    double top = (double)((1 << (bits - 1)) - 1), count = (double)n;
    double sum[FIT_LANES], low[FIT_LANES], high[FIT_LANES], offset[FIT_LANES],
        step[FIT_LANES], s_lx[FIT_LANES], mean_m[FIT_LANES];
    int64_t s_l[FIT_LANES], s_ll[FIT_LANES];
    uint8_t *levels[FIT_LANES], *fresh[FIT_LANES];
    int active[FIT_LANES];
    for (int j = 0; j < FIT_LANES; j++) {
        sum[j] = low[j] = high[j] = x[j][0];
        /* a lane past ``lanes`` only reads: lane 0's buffers */
        levels[j] = scratch + (size_t)(2 * (j < lanes ? j : 0)) * (size_t)n;
        fresh[j] = levels[j] + n;
        active[j] = j < lanes;
    }
    for (Py_ssize_t i = 1; i < n; i++)
        for (int j = 0; j < FIT_LANES; j++) {
            double v = x[j][i];
            sum[j] += v;
            if (v < low[j]) low[j] = v;
            if (v > high[j]) high[j] = v;
        }
    for (int j = 0; j < lanes; j++) {
        mean_m[j] = sum[j] / count;
        offset[j] = low[j];
        step[j] = (high[j] - low[j]) / top;
    }
    if (top == 0) {
        for (int j = 0; j < lanes; j++) {
            offset_out[j] = mean_m[j];
            step_out[j] = 0.0;
        }
        return;
    }
    for (int round = 0; round < rounds; round++) {
        int left = 0;
        for (int j = 0; j < lanes; j++) {
            if (!active[j])
                continue;
            unsigned moved;
            double inv = 1.0 / step[j];
            int fast = step[j] > 0 && inv >= DBL_MIN && inv <= DBL_MAX;
            if (!fast || assign_levels_fast(x[j], n, offset[j], step[j], inv, top, levels[j],
                                            fresh[j], &s_l[j], &s_ll[j], &moved))
                assign_levels(x[j], n, offset[j], step[j], top, levels[j], fresh[j], &s_l[j],
                              &s_ll[j], &moved);
            uint8_t *swap = levels[j];
            levels[j] = fresh[j];
            fresh[j] = swap;
            if (round > 0 && !moved)
                active[j] = 0;   /* final: its scales stay as they are */
            else
                left++;
        }
        if (!left)
            break;
        for (int j = 0; j < FIT_LANES; j++)
            s_lx[j] = (double)levels[j][0] * x[j][0];
        for (Py_ssize_t i = 1; i < n; i++)
            for (int j = 0; j < FIT_LANES; j++)
                s_lx[j] += (double)levels[j][i] * x[j][i];
        for (int j = 0; j < lanes; j++) {
            if (!active[j])
                continue;
            double mean_l = (double)s_l[j] / count;
            double spread = (double)s_ll[j] / count - mean_l * mean_l;
            double covariance = s_lx[j] / count - mean_l * mean_m[j];
            double fitted = spread > 1e-12 ? covariance / spread : step[j];
            step[j] = max_zero(fitted);
            offset[j] = max_zero(mean_m[j] - step[j] * mean_l);
        }
    }
    for (int j = 0; j < lanes; j++) {
        offset_out[j] = offset[j];
        step_out[j] = step[j];
    }
}

/* The magnitudes |wide(kept) - wide(base)| (the difference in the wide type, then float64), as
 * codecs.quant._fit_and_assign hands them to _fit. */
#define DEFINE_QUANT_MAGNITUDES(NAME, BITS, WIDE, TO_WIDE)                                   \
    VECTOR_CLONES static void NAME(const BITS *restrict kept, const BITS *restrict base,     \
                                   Py_ssize_t n, double *restrict out)                      \
    {                                                                                        \
        for (Py_ssize_t i = 0; i < n; i++)                                                   \
            out[i] = fabs((double)(TO_WIDE(kept[i]) - TO_WIDE(base[i])));                    \
    }

DEFINE_QUANT_MAGNITUDES(quant_magnitudes_bf16, uint16_t, float, bf16_wide)
DEFINE_QUANT_MAGNITUDES(quant_magnitudes_f16, uint16_t, float, f16_wide)
DEFINE_QUANT_MAGNITUDES(quant_magnitudes_f32, uint32_t, float, f32_wide)
DEFINE_QUANT_MAGNITUDES(quant_magnitudes_f64, uint64_t, double, f64_wide)

static void quant_magnitudes(int kind, const void *kept, const void *base, Py_ssize_t n,
                             double *out)
{
    switch (kind) {
    case KIND_BF16: quant_magnitudes_bf16(kept, base, n, out); break;
    case KIND_F16: quant_magnitudes_f16(kept, base, n, out); break;
    case KIND_F32: quant_magnitudes_f32(kept, base, n, out); break;
    default: quant_magnitudes_f64(kept, base, n, out); break;
    }
}

/* Fit every group of ``size`` values: from the magnitudes ``x`` when given, else from the
 * bits of ``kept`` and ``base`` (each group's magnitudes computed into a scratch buffer),
 * FIT_LANES groups side by side (fit_lanes), the last, shorter group alone.  Returns -1 when
 * out of memory. */
static int fit_groups(const double *x, int kind, const char *kept, const char *base,
                      Py_ssize_t itemsize, Py_ssize_t n, Py_ssize_t size, int bits, int rounds,
                      double *offsets, double *steps)
{
    Py_ssize_t scratch = size < n ? size : n;
    if (!scratch)
        return 0;
    int most = size <= FIT_LANES_UP_TO ? FIT_LANES : 1;
    uint8_t *levels = calloc((size_t)scratch, 2 * (size_t)most);
    double *magnitude = x ? NULL : malloc((size_t)scratch * (size_t)most * sizeof(double));
    if (!levels || (!x && !magnitude)) {
        free(levels);
        free(magnitude);
        return -1;
    }
    for (Py_ssize_t g = 0, first = 0; first < n;) {
        Py_ssize_t m = n - first < size ? n - first : size;
        int lanes = 1;  /* full groups FIT_LANES at a time; a short one alone */
        if (m == size)
            while (lanes < most && first + (lanes + 1) * size <= n)
                lanes++;
        const double *group[FIT_LANES];
        for (int j = 0; j < FIT_LANES; j++) {
            int source = j < lanes ? j : 0;
            if (x) {
                group[j] = x + first + source * m;
            } else {
                group[j] = magnitude + source * m;
                if (j < lanes)
                    quant_magnitudes(kind, kept + (first + j * m) * itemsize,
                                     base + (first + j * m) * itemsize, m, magnitude + j * m);
            }
        }
        fit_lanes(group, m, lanes, bits, rounds, levels, offsets + g, steps + g);
        g += lanes;
        first += lanes * m;
    }
    free(levels);
    free(magnitude);
    return 0;
}

static PyObject *quant_fit(PyObject *self, PyObject *args)
{
    PyObject *magnitude_object, *offsets_object, *steps_object;
    Py_ssize_t size;
    int bits, rounds;
    if (!PyArg_ParseTuple(args, "OniiOO", &magnitude_object, &size, &bits, &rounds,
                          &offsets_object, &steps_object))
        return NULL;
    if (bits < 1 || bits > 8 || size < 1 || rounds < 0)
        return PyErr_Format(PyExc_ValueError, "bad quant_fit arguments");
    Py_buffer magnitude = {0}, offsets = {0}, steps = {0};
    PyObject *result = NULL;
    if (get_buffer(magnitude_object, &magnitude, 0, 8, "magnitude") < 0 ||
        get_buffer(offsets_object, &offsets, 1, 8, "offsets") < 0 ||
        get_buffer(steps_object, &steps, 1, 8, "steps") < 0)
        goto done;
    Py_ssize_t n = magnitude.len / 8, groups = (n + size - 1) / size;
    if (offsets.len / 8 != groups || steps.len / 8 != groups) {
        PyErr_SetString(PyExc_ValueError, "offsets and steps must hold one value per group");
        goto done;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = fit_groups(magnitude.buf, 0, NULL, NULL, 0, n, size, bits, rounds, offsets.buf,
                        steps.buf);
    Py_END_ALLOW_THREADS
    result = failed ? PyErr_NoMemory() : Py_NewRef(Py_None);
done:
    release(&magnitude);
    release(&offsets);
    release(&steps);
    return result;
}

PyDoc_STRVAR(quant_non_finite_doc,
"quant_non_finite(kind, kept, base, out) -> int\n"
"\n"
"codecs.quant._non_finite: ``out`` (uint8) 1 where the wide base value, the wide kept value or\n"
"their difference is not finite; returns how many are.");

#define DEFINE_NON_FINITE(NAME, BITS, WIDE, TO_WIDE)                                         \
    VECTOR_CLONES static Py_ssize_t NAME(const BITS *restrict kept, const BITS *restrict base, \
                                         Py_ssize_t n, uint8_t *restrict out)               \
    {                                                                                        \
        Py_ssize_t found = 0;                                                                \
        for (Py_ssize_t i = 0; i < n; i++) {                                                 \
            WIDE k = TO_WIDE(kept[i]), b = TO_WIDE(base[i]);                                 \
            /* x - x is 0 for a finite x and NaN otherwise: one test for all three */        \
            WIDE d = k - b;                                                                  \
            uint8_t bad = ((k - k) != 0) | ((b - b) != 0) | ((d - d) != 0);                      \
            out[i] = bad;                                                                    \
            found += bad;                                                                    \
        }                                                                                    \
        return found;                                                                        \
    }

DEFINE_NON_FINITE(non_finite_bf16, uint16_t, float, bf16_wide)
DEFINE_NON_FINITE(non_finite_f16, uint16_t, float, f16_wide)
DEFINE_NON_FINITE(non_finite_f32, uint32_t, float, f32_wide)
DEFINE_NON_FINITE(non_finite_f64, uint64_t, double, f64_wide)

static PyObject *quant_non_finite(PyObject *self, PyObject *args)
{
    PyObject *kept_object, *base_object, *out_object;
    int kind;
    if (!PyArg_ParseTuple(args, "iOOO", &kind, &kept_object, &base_object, &out_object))
        return NULL;
    if (!known_kind(kind))
        return NULL;
    Py_ssize_t itemsize = KIND_ITEMSIZE[kind];
    Py_buffer kept = {0}, base = {0}, out = {0};
    PyObject *result = NULL;
    if (get_buffer(kept_object, &kept, 0, itemsize, "kept bits") < 0 ||
        get_buffer(base_object, &base, 0, itemsize, "base bits") < 0 ||
        get_buffer(out_object, &out, 1, 1, "out") < 0)
        goto done;
    Py_ssize_t n = kept.len / itemsize, found;
    if (base.len != kept.len || out.len != n) {
        PyErr_SetString(PyExc_ValueError, "quant_non_finite buffers differ in length");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case KIND_BF16: found = non_finite_bf16(kept.buf, base.buf, n, out.buf); break;
    case KIND_F16: found = non_finite_f16(kept.buf, base.buf, n, out.buf); break;
    case KIND_F32: found = non_finite_f32(kept.buf, base.buf, n, out.buf); break;
    default: found = non_finite_f64(kept.buf, base.buf, n, out.buf); break;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(found);
done:
    release(&kept);
    release(&base);
    release(&out);
    return result;
}

PyDoc_STRVAR(count_unequal_doc,
"count_unequal(a, b) -> int\n"
"\n"
"How many items of ``a`` and ``b`` (2, 4 or 8 bytes each, the same) differ in their bits.");

#define DEFINE_COUNT_UNEQUAL(NAME, BITS)                                                     \
    VECTOR_CLONES static Py_ssize_t NAME(const BITS *restrict a, const BITS *restrict b,    \
                                         Py_ssize_t n)                                      \
    {                                                                                        \
        Py_ssize_t found = 0;                                                                \
        for (Py_ssize_t i = 0; i < n; i++)                                                   \
            found += a[i] != b[i];                                                           \
        return found;                                                                        \
    }

DEFINE_COUNT_UNEQUAL(count_unequal_16, uint16_t)
DEFINE_COUNT_UNEQUAL(count_unequal_32, uint32_t)
DEFINE_COUNT_UNEQUAL(count_unequal_64, uint64_t)

static PyObject *count_unequal(PyObject *self, PyObject *args)
{
    PyObject *a_object, *b_object;
    if (!PyArg_ParseTuple(args, "OO", &a_object, &b_object))
        return NULL;
    Py_buffer a = {0}, b = {0};
    PyObject *result = NULL;
    if (PyObject_GetBuffer(a_object, &a, PyBUF_CONTIG_RO | PyBUF_FORMAT) < 0)
        goto done;
    Py_ssize_t itemsize = a.itemsize;
    if (itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_TypeError, "a has %zd-byte items", itemsize);
        goto done;
    }
    if (get_buffer(b_object, &b, 0, itemsize, "b") < 0)
        goto done;
    if (a.len != b.len) {
        PyErr_SetString(PyExc_ValueError, "count_unequal buffers differ in length");
        goto done;
    }
    Py_ssize_t n = a.len / itemsize, found;
    Py_BEGIN_ALLOW_THREADS
    switch (itemsize) {
    case 2: found = count_unequal_16(a.buf, b.buf, n); break;
    case 4: found = count_unequal_32(a.buf, b.buf, n); break;
    default: found = count_unequal_64(a.buf, b.buf, n); break;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(found);
done:
    release(&a);
    release(&b);
    return result;
}

PyDoc_STRVAR(quant_fit_bits_doc,
"quant_fit_bits(kind, kept, base, size, bits, rounds, offsets, steps)\n"
"\n"
"quant_fit from the bits of the kept fine-tuned values and their base values (``kind`` as\n"
"for merge_block): the magnitudes |wide(kept) - wide(base)| as float64, a group at a time,\n"
"never all at once.");

static PyObject *quant_fit_bits(PyObject *self, PyObject *args)
{
    PyObject *kept_object, *base_object, *offsets_object, *steps_object;
    Py_ssize_t size;
    int kind, bits, rounds;
    if (!PyArg_ParseTuple(args, "iOOniiOO", &kind, &kept_object, &base_object, &size, &bits,
                          &rounds, &offsets_object, &steps_object))
        return NULL;
    if (!known_kind(kind))
        return NULL;
    if (bits < 1 || bits > 8 || size < 1 || rounds < 0)
        return PyErr_Format(PyExc_ValueError, "bad quant_fit_bits arguments");
    Py_ssize_t itemsize = KIND_ITEMSIZE[kind];
    Py_buffer kept = {0}, base = {0}, offsets = {0}, steps = {0};
    PyObject *result = NULL;
    if (get_buffer(kept_object, &kept, 0, itemsize, "kept bits") < 0 ||
        get_buffer(base_object, &base, 0, itemsize, "base bits") < 0 ||
        get_buffer(offsets_object, &offsets, 1, 8, "offsets") < 0 ||
        get_buffer(steps_object, &steps, 1, 8, "steps") < 0)
        goto done;
    Py_ssize_t n = kept.len / itemsize, groups = (n + size - 1) / size;
    if (base.len != kept.len) {
        PyErr_SetString(PyExc_ValueError, "kept and base bits differ in length");
        goto done;
    }
    if (offsets.len / 8 != groups || steps.len / 8 != groups) {
        PyErr_SetString(PyExc_ValueError, "offsets and steps must hold one value per group");
        goto done;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = fit_groups(NULL, kind, kept.buf, base.buf, itemsize, n, size, bits, rounds,
                        offsets.buf, steps.buf);
    Py_END_ALLOW_THREADS
    result = failed ? PyErr_NoMemory() : Py_NewRef(Py_None);
done:
    release(&kept);
    release(&base);
    release(&offsets);
    release(&steps);
    return result;
}

PyDoc_STRVAR(magnitude_keys_doc,
"magnitude_keys(kind, finetuned, base, out, scale=1.0)\n"
"\n"
"localize.topk.magnitude_keys into uint32 ``out``: the float32 bits of |wide(fine-tuned) -\n"
"wide(base)| (a float64 difference rounded to float32), 0 where that is NaN but the bits\n"
"are equal (an unchanged inf or NaN); times float32(``scale``) in float32 where it is not 1.\n"
"``kind`` as for merge_block.");

#define KEY_INF 0x7F800000u

PyDoc_STRVAR(key_histogram_doc,
"key_histogram(keys, counts, energy)\n"
"\n"
"Add uint32 ranking ``keys`` (float32 bits of |tau|) to the 65,536-bin histograms of their\n"
"high 16 bits: ``counts`` (int64) +1 per key, ``energy`` (float64) + the key's value squared\n"
"(in float64) for finite keys, in key order -- what numpy's bincount adds, bit for bit.");

/* Each key counted in the bin of its high 16 bits, and the square of a finite one (the key as
 * a float32) added to that bin's energy in float64, in key order. */
static void bin_keys(const uint32_t *k, Py_ssize_t n, int64_t *c, double *e)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t key = k[i];
        c[key >> 16]++;
        if (key < KEY_INF) {
            float value;
            memcpy(&value, &key, 4);
            e[key >> 16] += (double)value * (double)value;
        }
    }
}

/* ``counts`` (int64) and ``energy`` (float64) of 65,536 key bins each, writable: 0, or -1
 * with an exception set. */
static int histogram_buffers(PyObject *counts_object, PyObject *energy_object,
                             Py_buffer *counts, Py_buffer *energy)
{
    if (get_buffer(counts_object, counts, 1, 8, "counts") < 0 ||
        get_buffer(energy_object, energy, 1, 8, "energy") < 0)
        return -1;
    if (counts->len != 8 << 16 || energy->len != 8 << 16) {
        PyErr_SetString(PyExc_ValueError, "counts and energy must hold 65536 bins");
        return -1;
    }
    return 0;
}

static PyObject *key_histogram(PyObject *self, PyObject *args)
{
    PyObject *keys_object, *counts_object, *energy_object;
    if (!PyArg_ParseTuple(args, "OOO", &keys_object, &counts_object, &energy_object))
        return NULL;
    Py_buffer keys = {0}, counts = {0}, energy = {0};
    PyObject *result = NULL;
    if (get_buffer(keys_object, &keys, 0, 4, "keys") < 0 ||
        histogram_buffers(counts_object, energy_object, &counts, &energy) < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    bin_keys(keys.buf, keys.len / 4, counts.buf, energy.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&keys);
    release(&counts);
    release(&energy);
    return result;
}

PyDoc_STRVAR(key_counts_doc,
"key_counts(keys, counts)\n"
"\n"
"Add uint32 ``keys`` to ``counts`` (int64, 65,536 bins), one per key in the bin of its high\n"
"16 bits: what np.bincount(keys >> 16) counts.");

static PyObject *key_counts(PyObject *self, PyObject *args)
{
    PyObject *keys_object, *counts_object;
    if (!PyArg_ParseTuple(args, "OO", &keys_object, &counts_object))
        return NULL;
    Py_buffer keys = {0}, counts = {0};
    PyObject *result = NULL;
    if (get_buffer(keys_object, &keys, 0, 4, "keys") < 0 ||
        get_buffer(counts_object, &counts, 1, 8, "counts") < 0)
        goto done;
    if (counts.len != 8 << 16) {
        PyErr_SetString(PyExc_ValueError, "counts must hold 65536 bins");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const uint32_t *k = keys.buf;
    int64_t *c = counts.buf;
    Py_ssize_t n = keys.len / 4;
    for (Py_ssize_t i = 0; i < n; i++)
        c[k[i] >> 16]++;
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&keys);
    release(&counts);
    return result;
}

PyDoc_STRVAR(keys_at_least_doc,
"keys_at_least(keys, threshold, out) -> int\n"
"\n"
"Write the indices of the uint32 ``keys`` that are >= ``threshold`` into int64 ``out`` (in\n"
"increasing order, as far as it holds them); return how many there are.");

static PyObject *keys_at_least(PyObject *self, PyObject *args)
{
    PyObject *keys_object, *out_object;
    unsigned int threshold;
    if (!PyArg_ParseTuple(args, "OIO", &keys_object, &threshold, &out_object))
        return NULL;
    Py_buffer keys = {0}, out = {0};
    PyObject *result = NULL;
    if (get_buffer(keys_object, &keys, 0, 4, "keys") < 0 ||
        get_buffer(out_object, &out, 1, 8, "out") < 0)
        goto done;
    Py_ssize_t found = 0, capacity = out.len / 8, n = keys.len / 4;
    Py_BEGIN_ALLOW_THREADS
    const uint32_t *k = keys.buf;
    int64_t *o = out.buf;
    if (capacity >= n) {  /* room for every index: no branch on the key */
        for (Py_ssize_t i = 0; i < n; i++) {
            o[found] = i;
            found += k[i] >= threshold;
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (k[i] >= threshold) {
                if (found < capacity)
                    o[found] = i;
                found++;
            }
        }
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(found);
done:
    release(&keys);
    release(&out);
    return result;
}


PyDoc_STRVAR(select_at_least_doc,
"select_at_least(keys, threshold, finetuned, base, kept_finetuned, kept_base, kept_keys,\n"
"                packed, first_bit) -> int\n"
"\n"
"One block of a selection by threshold, in one pass: the elements whose uint32 ``keys`` are\n"
">= ``threshold`` have their ``finetuned`` and ``base`` bits (items of 2, 4 or 8 bytes) and\n"
"their keys copied, in order, to the front of ``kept_*`` (each with room for every element),\n"
"and their bits set in ``packed`` (uint8, the codec's little-endian bit order), element i at\n"
"bit ``first_bit + i``; returns how many were kept.");

#define DEFINE_SELECT_AT_LEAST(NAME, BITS)                                                   \
    static Py_ssize_t NAME(const uint32_t *restrict keys, uint32_t threshold,               \
                           const BITS *restrict finetuned, const BITS *restrict base,       \
                           Py_ssize_t n, BITS *restrict kept_finetuned,                     \
                           BITS *restrict kept_base, uint32_t *restrict kept_keys,          \
                           uint8_t *restrict packed, int first_bit)                         \
    {                                                                                        \
        Py_ssize_t found = 0, i = 0;                                                         \
        int bit = first_bit;                                                                 \
        unsigned byte = 0;                                                                   \
        /* no branch on the keys: every element is written, the count moves by the test */  \
        for (; i < n; i++) {                                                                 \
            unsigned keep = keys[i] >= threshold;                                            \
            kept_finetuned[found] = finetuned[i];                                            \
            kept_base[found] = base[i];                                                      \
            kept_keys[found] = keys[i];                                                      \
            found += keep;                                                                   \
            byte |= keep << bit;                                                             \
            if (++bit == 8) {                                                                \
                *packed++ |= (uint8_t)byte;                                                  \
                byte = 0;                                                                    \
                bit = 0;                                                                     \
            }                                                                                \
        }                                                                                    \
        if (bit)                                                                             \
            *packed |= (uint8_t)byte;                                                        \
        return found;                                                                        \
    }

DEFINE_SELECT_AT_LEAST(select_at_least_16, uint16_t)
DEFINE_SELECT_AT_LEAST(select_at_least_32, uint32_t)
DEFINE_SELECT_AT_LEAST(select_at_least_64, uint64_t)

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
/* select_at_least_16 / _32 eight elements at a time: the kept lanes packed to the front of a
 * vector by the COMPRESS tables and stored at the kept count (the outputs have room for
 * every element, so a whole vector fits wherever it starts), eight bitmap bits a step; the
 * last n % 8 elements by the loop above, from where this stops. */
#define DEFINE_SELECT_AT_LEAST_AVX2(NAME, SCALAR, BITS, LOAD_PACK_STORE)                    \
    __attribute__((target("avx2"))) static Py_ssize_t NAME(                                 \
        const uint32_t *restrict keys, uint32_t threshold, const BITS *restrict finetuned,  \
        const BITS *restrict base, Py_ssize_t n, BITS *restrict kept_finetuned,             \
        BITS *restrict kept_base, uint32_t *restrict kept_keys, uint8_t *restrict packed,   \
        int first_bit)                                                                      \
    {                                                                                        \
        if (threshold == 0) /* every element: the scalar loop's test, never false */        \
            return SCALAR(keys, threshold, finetuned, base, n, kept_finetuned, kept_base,   \
                          kept_keys, packed, first_bit);                                    \
        /* keys >= threshold as signed lanes: key ^ 2^31 > (threshold - 1) ^ 2^31 */        \
        const __m256i flip = _mm256_set1_epi32((int)0x80000000u);                          \
        const __m256i below = _mm256_set1_epi32((int)((threshold - 1) ^ 0x80000000u));     \
        Py_ssize_t found = 0, i = 0;                                                         \
        unsigned carry = 0;                                                                  \
        for (; i + 8 <= n; i += 8) {                                                         \
            __m256i k = _mm256_loadu_si256((const __m256i *)(keys + i));                    \
            __m256i keep = _mm256_cmpgt_epi32(_mm256_xor_si256(k, flip), below);            \
            unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(keep));           \
            __m256i order = _mm256_loadu_si256((const __m256i *)COMPRESS32[m]);             \
            _mm256_storeu_si256((__m256i *)(kept_keys + found),                             \
                                _mm256_permutevar8x32_epi32(k, order));                     \
            LOAD_PACK_STORE(finetuned, kept_finetuned);                                     \
            LOAD_PACK_STORE(base, kept_base);                                               \
            *packed++ |= (uint8_t)(carry | m << first_bit);                                 \
            carry = m >> (8 - first_bit);                                                   \
            found += POP8[m];                                                               \
        }                                                                                    \
        if (i == n) {                                                                        \
            if (first_bit)                                                                   \
                *packed |= (uint8_t)carry;                                                   \
            return found;                                                                    \
        }                                                                                    \
        /* the rest: the scalar loop from bit first_bit of this byte, the carry set first */ \
        *packed |= (uint8_t)carry;                                                           \
        return found + SCALAR(keys + i, threshold, finetuned + i, base + i, n - i,          \
                              kept_finetuned + found, kept_base + found, kept_keys + found, \
                              packed, first_bit);                                           \
    }

#define PACK16(FROM, TO)                                                                    \
    _mm_storeu_si128((__m128i *)(TO + found),                                               \
                     _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(FROM + i)),          \
                                      _mm_loadu_si128((const __m128i *)COMPRESS16[m])))
#define PACK32(FROM, TO)                                                                    \
    _mm256_storeu_si256((__m256i *)(TO + found),                                            \
                        _mm256_permutevar8x32_epi32(                                        \
                            _mm256_loadu_si256((const __m256i *)(FROM + i)), order))

DEFINE_SELECT_AT_LEAST_AVX2(select_at_least_16_avx2, select_at_least_16, uint16_t, PACK16)
DEFINE_SELECT_AT_LEAST_AVX2(select_at_least_32_avx2, select_at_least_32, uint32_t, PACK32)
#define SELECT_AT_LEAST_16 (cpu_has_avx2 ? select_at_least_16_avx2 : select_at_least_16)
#define SELECT_AT_LEAST_32 (cpu_has_avx2 ? select_at_least_32_avx2 : select_at_least_32)
#else
#define SELECT_AT_LEAST_16 select_at_least_16
#define SELECT_AT_LEAST_32 select_at_least_32
#endif

static PyObject *select_at_least(PyObject *self, PyObject *args)
{
    PyObject *keys_object, *ft_object, *base_object, *kft_object, *kbase_object, *kkeys_object,
        *packed_object;
    unsigned int threshold;
    int first_bit;
    if (!PyArg_ParseTuple(args, "OIOOOOOOi", &keys_object, &threshold, &ft_object, &base_object,
                          &kft_object, &kbase_object, &kkeys_object, &packed_object, &first_bit))
        return NULL;
    if (first_bit < 0 || first_bit > 7)
        return PyErr_Format(PyExc_ValueError, "first_bit %d is not 0..7", first_bit);
    Py_buffer keys = {0}, ft = {0}, base = {0}, kft = {0}, kbase = {0}, kkeys = {0}, packed = {0};
    PyObject *result = NULL;
    if (get_buffer(keys_object, &keys, 0, 4, "keys") < 0 ||
        PyObject_GetBuffer(ft_object, &ft, PyBUF_CONTIG_RO | PyBUF_FORMAT) < 0)
        goto done;
    Py_ssize_t itemsize = ft.itemsize, n = keys.len / 4;
    if (itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_TypeError, "finetuned has %zd-byte items", itemsize);
        goto done;
    }
    if (get_buffer(base_object, &base, 0, itemsize, "base") < 0 ||
        get_buffer(kft_object, &kft, 1, itemsize, "kept_finetuned") < 0 ||
        get_buffer(kbase_object, &kbase, 1, itemsize, "kept_base") < 0 ||
        get_buffer(kkeys_object, &kkeys, 1, 4, "kept_keys") < 0 ||
        get_buffer(packed_object, &packed, 1, 1, "packed") < 0)
        goto done;
    if (ft.len != n * itemsize || base.len != n * itemsize || kft.len < n * itemsize ||
        kbase.len < n * itemsize || kkeys.len < n * 4 || packed.len < (first_bit + n + 7) / 8) {
        PyErr_SetString(PyExc_ValueError, "select_at_least buffers differ in length");
        goto done;
    }
    Py_ssize_t found;
    Py_BEGIN_ALLOW_THREADS
    switch (itemsize) {
    case 2: found = SELECT_AT_LEAST_16(keys.buf, threshold, ft.buf, base.buf, n, kft.buf, kbase.buf, kkeys.buf, packed.buf, first_bit); break;
    case 4: found = SELECT_AT_LEAST_32(keys.buf, threshold, ft.buf, base.buf, n, kft.buf, kbase.buf, kkeys.buf, packed.buf, first_bit); break;
    default: found = select_at_least_64(keys.buf, threshold, ft.buf, base.buf, n, kft.buf, kbase.buf, kkeys.buf, packed.buf, first_bit); break;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(found);
done:
    release(&keys);
    release(&ft);
    release(&base);
    release(&kft);
    release(&kbase);
    release(&kkeys);
    release(&packed);
    return result;
}

#define DEFINE_KEYS(NAME, BITS, TO_WIDE)                                                    \
    VECTOR_CLONES static void NAME(const BITS *restrict finetuned, const BITS *restrict base,             \
                     uint32_t *restrict keys, Py_ssize_t n)                                 \
    {                                                                                       \
        for (Py_ssize_t i = 0; i < n; i++) {                                                \
            /* |round(x)| == round(|x|): rounding to float32 is symmetric in the sign */    \
            float tau = (float)(TO_WIDE(finetuned[i]) - TO_WIDE(base[i]));                  \
            uint32_t key;                                                                   \
            memcpy(&key, &tau, 4);                                                          \
            key &= 0x7FFFFFFFu; /* the absolute value, of a NaN too (as numpy's abs) */     \
            keys[i] = key > KEY_INF && finetuned[i] == base[i] ? 0 : key;                   \
        }                                                                                   \
    }

DEFINE_KEYS(keys_bf16, uint16_t, bf16_wide)
DEFINE_KEYS(keys_f16, uint16_t, f16_wide)
DEFINE_KEYS(keys_f32, uint32_t, f32_wide)
DEFINE_KEYS(keys_f64, uint64_t, f64_wide)

/* The keys above times a float32 ``scale``, rounded to float32: what numpy's float32 product
 * of the keys (viewed as float32) and the scale gives, bit for bit (a NaN key stays a NaN). */
#define DEFINE_SCALED_KEYS(NAME, BITS, TO_WIDE)                                             \
    VECTOR_CLONES static void NAME(const BITS *restrict finetuned, const BITS *restrict base,             \
                     uint32_t *restrict keys, Py_ssize_t n, float scale)                    \
    {                                                                                       \
        for (Py_ssize_t i = 0; i < n; i++) {                                                \
            float tau = (float)(TO_WIDE(finetuned[i]) - TO_WIDE(base[i]));                  \
            uint32_t key;                                                                   \
            memcpy(&key, &tau, 4);                                                          \
            key &= 0x7FFFFFFFu;                                                             \
            key = key > KEY_INF && finetuned[i] == base[i] ? 0 : key;                       \
            float value;                                                                    \
            memcpy(&value, &key, 4);                                                        \
            value *= scale;                                                                 \
            memcpy(&keys[i], &value, 4);                                                    \
        }                                                                                   \
    }

DEFINE_SCALED_KEYS(scaled_keys_bf16, uint16_t, bf16_wide)
DEFINE_SCALED_KEYS(scaled_keys_f16, uint16_t, f16_wide)
DEFINE_SCALED_KEYS(scaled_keys_f32, uint32_t, f32_wide)
DEFINE_SCALED_KEYS(scaled_keys_f64, uint64_t, f64_wide)

/* The fine-tuned and base bits of a float ``kind`` and the uint32 keys' ``out``, checked
 * alike in length: their element count, or -1 with an exception set. */
static Py_ssize_t key_buffers(int kind, PyObject *finetuned_object, PyObject *base_object,
                              PyObject *out_object, Py_buffer *finetuned, Py_buffer *base,
                              Py_buffer *out)
{
    Py_ssize_t itemsize = KIND_ITEMSIZE[kind];
    if (get_buffer(finetuned_object, finetuned, 0, itemsize, "fine-tuned bits") < 0 ||
        get_buffer(base_object, base, 0, itemsize, "base bits") < 0 ||
        get_buffer(out_object, out, 1, 4, "out") < 0)
        return -1;
    Py_ssize_t n = finetuned->len / itemsize;
    if (base->len / itemsize != n || out->len / 4 != n) {
        PyErr_SetString(PyExc_ValueError, "fine-tuned bits, base bits and out differ in length");
        return -1;
    }
    return n;
}

static PyObject *magnitude_keys(PyObject *self, PyObject *args)
{
    int kind;
    PyObject *finetuned_object, *base_object, *out_object;
    double scale = 1.0;
    if (!PyArg_ParseTuple(args, "iOOO|d", &kind, &finetuned_object, &base_object, &out_object,
                          &scale))
        return NULL;
    if (!known_kind(kind))
        return NULL;
    Py_buffer finetuned = {0}, base = {0}, out = {0};
    PyObject *result = NULL;
    Py_ssize_t n = key_buffers(kind, finetuned_object, base_object, out_object, &finetuned,
                               &base, &out);
    if (n < 0)
        goto done;
    float factor = (float)scale;  /* numpy's np.float32(scale) */
    Py_BEGIN_ALLOW_THREADS
    if (scale == 1.0) {
        switch (kind) {
        case KIND_BF16: keys_bf16(finetuned.buf, base.buf, out.buf, n); break;
        case KIND_F16: keys_f16(finetuned.buf, base.buf, out.buf, n); break;
        case KIND_F32: keys_f32(finetuned.buf, base.buf, out.buf, n); break;
        default: keys_f64(finetuned.buf, base.buf, out.buf, n);
        }
    } else {
        switch (kind) {
        case KIND_BF16: scaled_keys_bf16(finetuned.buf, base.buf, out.buf, n, factor); break;
        case KIND_F16: scaled_keys_f16(finetuned.buf, base.buf, out.buf, n, factor); break;
        case KIND_F32: scaled_keys_f32(finetuned.buf, base.buf, out.buf, n, factor); break;
        default: scaled_keys_f64(finetuned.buf, base.buf, out.buf, n, factor);
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&finetuned);
    release(&base);
    release(&out);
    return result;
}

PyDoc_STRVAR(keyed_histogram_doc,
"keyed_histogram(kind, finetuned, base, out, counts, energy) -> int\n"
"\n"
"magnitude_keys, key_histogram and count_unequal in one pass: the keys into uint32 ``out``,\n"
"added to ``counts`` and ``energy`` (65,536 bins each, in key order, as key_histogram adds\n"
"them); returns how many elements' bits differ.  A chunk at a time, so the keys are counted\n"
"and the bits compared while they are in the cache: the same keys, bins and count.");

/* Elements a chunk of keyed_histogram: its keys (4 bytes each) and bits stay in L1. */
#define KEYED_CHUNK 2048

static PyObject *keyed_histogram(PyObject *self, PyObject *args)
{
    int kind;
    PyObject *finetuned_object, *base_object, *out_object, *counts_object, *energy_object;
    if (!PyArg_ParseTuple(args, "iOOOOO", &kind, &finetuned_object, &base_object, &out_object,
                          &counts_object, &energy_object))
        return NULL;
    if (!known_kind(kind))
        return NULL;
    Py_ssize_t itemsize = KIND_ITEMSIZE[kind];
    Py_buffer finetuned = {0}, base = {0}, out = {0}, counts = {0}, energy = {0};
    PyObject *result = NULL;
    Py_ssize_t n = key_buffers(kind, finetuned_object, base_object, out_object, &finetuned,
                               &base, &out);
    if (n < 0 || histogram_buffers(counts_object, energy_object, &counts, &energy) < 0)
        goto done;
    Py_ssize_t changed = 0;
    Py_BEGIN_ALLOW_THREADS
    const char *ft = finetuned.buf, *bs = base.buf;
    uint32_t *keys = out.buf;
    int64_t *c = counts.buf;
    double *e = energy.buf;
    for (Py_ssize_t at = 0; at < n; at += KEYED_CHUNK) {
        Py_ssize_t m = n - at < KEYED_CHUNK ? n - at : KEYED_CHUNK;
        const void *f = ft + at * itemsize, *b = bs + at * itemsize;
        switch (kind) {
        case KIND_BF16: keys_bf16(f, b, keys + at, m); changed += count_unequal_16(f, b, m); break;
        case KIND_F16: keys_f16(f, b, keys + at, m); changed += count_unequal_16(f, b, m); break;
        case KIND_F32: keys_f32(f, b, keys + at, m); changed += count_unequal_32(f, b, m); break;
        default: keys_f64(f, b, keys + at, m); changed += count_unequal_64(f, b, m);
        }
        bin_keys(keys + at, m, c, e);
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(changed);
done:
    release(&finetuned);
    release(&base);
    release(&out);
    release(&counts);
    release(&energy);
    return result;
}

PyDoc_STRVAR(select_bracket_doc,
"select_bracket(keys, low, high, above, inside, inside_keys) -> (n_above, n_inside)\n"
"\n"
"Indices of the uint32 ``keys`` above ``high`` into int64 ``above``, and of those in\n"
"[low, high] into int64 ``inside`` with their keys in uint32 ``inside_keys``, in order;\n"
"each output must hold len(keys) (only the counted prefix is written).");

static PyObject *select_bracket(PyObject *self, PyObject *args)
{
    PyObject *keys_object, *above_object, *inside_object, *inside_keys_object;
    unsigned long low, high;
    if (!PyArg_ParseTuple(args, "OkkOOO", &keys_object, &low, &high, &above_object,
                          &inside_object, &inside_keys_object))
        return NULL;
    Py_buffer keys = {0}, above = {0}, inside = {0}, inside_keys = {0};
    PyObject *result = NULL;
    if (get_buffer(keys_object, &keys, 0, 4, "keys") < 0 ||
        get_buffer(above_object, &above, 1, 8, "above") < 0 ||
        get_buffer(inside_object, &inside, 1, 8, "inside") < 0 ||
        get_buffer(inside_keys_object, &inside_keys, 1, 4, "inside_keys") < 0)
        goto done;
    Py_ssize_t n = keys.len / 4;
    if (above.len / 8 < n || inside.len / 8 < n || inside_keys.len / 4 < n) {
        PyErr_SetString(PyExc_ValueError, "every output must hold as many items as keys");
        goto done;
    }
    Py_ssize_t n_above = 0, n_inside = 0;
    Py_BEGIN_ALLOW_THREADS
    const uint32_t *k = keys.buf;
    int64_t *above_at = above.buf, *inside_at = inside.buf;
    uint32_t *inside_key = inside_keys.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t key = k[i];
        if (key < low)
            continue;
        if (key > high) {
            above_at[n_above++] = i;
        } else {
            inside_at[n_inside] = i;
            inside_key[n_inside++] = key;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nn", n_above, n_inside);
done:
    release(&keys);
    release(&above);
    release(&inside);
    release(&inside_keys);
    return result;
}

/* ---- float16 conversions, exposed for the exhaustive tests ------------------------ */

PyDoc_STRVAR(f16_convert_doc,
"f16_convert(source, target, to_wide)\n"
"\n"
"Fill ``target`` with the float32 values of float16 bits ``source`` (``to_wide``), or\n"
"the float16 bits of float32 values ``source`` (round to nearest even; NaN as 0x7E00 with\n"
"its sign): the conversions merge_block uses, for tests against numpy.");

static PyObject *f16_convert(PyObject *self, PyObject *args)
{
    PyObject *source_object, *target_object;
    int to_wide;
    if (!PyArg_ParseTuple(args, "OOp", &source_object, &target_object, &to_wide))
        return NULL;
    Py_buffer source = {0}, target = {0};
    PyObject *result = NULL;
    if (get_buffer(source_object, &source, 0, to_wide ? 2 : 4, "source") < 0 ||
        get_buffer(target_object, &target, 1, to_wide ? 4 : 2, "target") < 0)
        goto done;
    Py_ssize_t n = source.len / source.itemsize;
    if (target.len / target.itemsize != n) {
        PyErr_SetString(PyExc_ValueError, "source and target differ in length");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (to_wide) {
        const uint16_t *in = source.buf;
        float *out = target.buf;
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = f16_wide(in[i]);
    } else {
        const float *in = source.buf;
        uint16_t *out = target.buf;
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = f16_round(in[i]);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&source);
    release(&target);
    return result;
}

PyDoc_STRVAR(sort_select_doc,
"sort_select(values, lo, hi, descending, depth_limit, mask) -> bool\n"
"\n"
"Sets ``mask[j] = 1`` (uint8) for the elements that torch's CPU sort of the float32\n"
"``values`` (``torch.sort(values, descending=...)``: libstdc++'s ``std::sort`` of (value,\n"
"index) pairs, NaN first when descending and last when ascending) places at positions\n"
"``lo`` to ``hi - 1`` -- equal values included exactly as that sort orders them -- without\n"
"sorting the whole array: the sort's own partitions are made, in its order and with its\n"
"pivots, but only segments with ``lo`` or ``hi`` strictly inside are divided further (the\n"
"others' members stay on their side whatever order the sort would give them), and a last\n"
"segment of 16 or fewer is ordered by the sort's insertion sort.  ``depth_limit`` is the\n"
"sort's (``2 * floor(log2(n))``); where a divided segment reaches it, ``std::sort`` would\n"
"heap-sort it, which is not reproduced: False is returned (the mask then means nothing).\n"
"``values`` may also be ``(kind, finetuned, base)``: the values are then abs_tau's, made\n"
"as they are copied (no array of them).");

/* One (value, index) pair as torch's sort moves them (its composite accessor). */
typedef struct { float value; uint32_t index; } SortPair;

/* Whether pair a comes strictly before pair b: torch's KeyValueCompDesc / KeyValueCompAsc. */
static inline int before_desc(float a, float b)
{
    return (isnan(a) && !isnan(b)) || a > b;
}

static inline int before_asc(float a, float b)
{
    return (!isnan(a) && isnan(b)) || a < b;
}

#define DEFINE_SORT_SELECT(SUFFIX, BEFORE)                                                   \
    static inline void median_to_first_##SUFFIX(SortPair *p, Py_ssize_t result,             \
                                                Py_ssize_t a, Py_ssize_t b, Py_ssize_t c)  \
    {   /* libstdc++'s __move_median_to_first */                                             \
        Py_ssize_t chosen;                                                                   \
        if (BEFORE(p[a].value, p[b].value)) {                                                \
            if (BEFORE(p[b].value, p[c].value)) chosen = b;                                  \
            else if (BEFORE(p[a].value, p[c].value)) chosen = c;                             \
            else chosen = a;                                                                 \
        } else if (BEFORE(p[a].value, p[c].value)) chosen = a;                               \
        else if (BEFORE(p[b].value, p[c].value)) chosen = c;                                 \
        else chosen = b;                                                                     \
        SortPair t = p[result]; p[result] = p[chosen]; p[chosen] = t;                        \
    }                                                                                        \
                                                                                             \
    static inline Py_ssize_t partition_##SUFFIX(SortPair *p, Py_ssize_t first,              \
                                                Py_ssize_t last, float pivot)               \
    {   /* libstdc++'s __unguarded_partition around the pivot's value */                     \
        for (;;) {                                                                           \
            while (BEFORE(p[first].value, pivot))                                            \
                first++;                                                                     \
            last--;                                                                          \
            while (BEFORE(pivot, p[last].value))                                             \
                last--;                                                                      \
            if (!(first < last))                                                             \
                return first;                                                                \
            SortPair t = p[first]; p[first] = p[last]; p[last] = t;                          \
            first++;                                                                         \
        }                                                                                    \
    }                                                                                        \
                                                                                             \
    static void insertion_##SUFFIX(SortPair *p, Py_ssize_t first, Py_ssize_t last)           \
    {   /* libstdc++'s insertion sort: stable, moves only past strictly later pairs */       \
        for (Py_ssize_t i = first + 1; i < last; i++) {                                      \
            SortPair moved = p[i];                                                           \
            Py_ssize_t j = i;                                                                \
            while (j > first && BEFORE(moved.value, p[j - 1].value)) {                       \
                p[j] = p[j - 1];                                                             \
                j--;                                                                         \
            }                                                                                \
            p[j] = moved;                                                                    \
        }                                                                                    \
    }                                                                                        \
                                                                                             \
    /* libstdc++'s __introsort_loop, dividing only segments with a bound strictly inside. */ \
    static int select_loop_##SUFFIX(SortPair *p, Py_ssize_t first, Py_ssize_t last,         \
                                    int depth, Py_ssize_t lo, Py_ssize_t hi)                \
    {                                                                                        \
        while (last - first > 16) {                                                          \
            if (!((first < lo && lo < last) || (first < hi && hi < last)))                   \
                return 1;                                                                    \
            if (depth == 0)                                                                  \
                return 0;                                                                    \
            depth--;                                                                         \
            median_to_first_##SUFFIX(p, first, first + 1, first + (last - first) / 2,        \
                                     last - 1);                                              \
            Py_ssize_t cut = partition_##SUFFIX(p, first + 1, last, p[first].value);         \
            if (!select_loop_##SUFFIX(p, cut, last, depth, lo, hi))                          \
                return 0;                                                                    \
            last = cut;                                                                      \
        }                                                                                    \
        if ((first < lo && lo < last) || (first < hi && hi < last))                          \
            insertion_##SUFFIX(p, first, last);                                              \
        return 1;                                                                            \
    }

DEFINE_SORT_SELECT(desc, before_desc)
DEFINE_SORT_SELECT(asc, before_asc)

/* |wide(tune) - wide(base)| rounded to float32, +0.0 where the bits are equal: the magnitude
   mergekit ranks (``tau.abs().float()`` of merge's dense task vector). */
#define ABS_TAU(TO_WIDE, FABS, TUNE, BASE)                                                   \
    ((TUNE) != (BASE) ? (float)FABS(TO_WIDE(TUNE) - TO_WIDE(BASE)) : 0.0f)

/* Pairs of ABS_TAU's values and their index. */
#define DEFINE_TAU_PAIRS(NAME, BITS, TO_WIDE, FABS)                                           \
    static void NAME(const BITS *tune, const BITS *base, Py_ssize_t n, SortPair *pairs)      \
    {                                                                                        \
        for (Py_ssize_t i = 0; i < n; i++) {                                                 \
            pairs[i].value = ABS_TAU(TO_WIDE, FABS, tune[i], base[i]);                       \
            pairs[i].index = (uint32_t)i;                                                    \
        }                                                                                    \
    }

DEFINE_TAU_PAIRS(tau_pairs_bf16, uint16_t, bf16_wide, fabsf)
DEFINE_TAU_PAIRS(tau_pairs_f16, uint16_t, f16_wide, fabsf)
DEFINE_TAU_PAIRS(tau_pairs_f32, uint32_t, f32_wide, fabsf)
DEFINE_TAU_PAIRS(tau_pairs_f64, uint64_t, f64_wide, fabs)

static PyObject *sort_select(PyObject *self, PyObject *args)
{
    PyObject *values_object, *mask_object, *tune_object = NULL, *base_object = NULL;
    Py_ssize_t lo, hi;
    int descending, depth, kind = -1;
    if (!PyArg_ParseTuple(args, "OnnpiO", &values_object, &lo, &hi, &descending, &depth,
                          &mask_object))
        return NULL;
    Py_buffer values = {0}, base = {0}, mask = {0};
    PyObject *result = NULL;
    Py_ssize_t n;
    if (PyTuple_Check(values_object)) {  /* (kind, fine-tuned bits, base bits) */
        if (!PyArg_ParseTuple(values_object, "iOO;values is float32 or (kind, finetuned, base)",
                              &kind, &tune_object, &base_object) || !known_kind(kind))
            goto done;
        if (get_buffer(tune_object, &values, 0, KIND_ITEMSIZE[kind], "finetuned") < 0
            || get_buffer(base_object, &base, 0, KIND_ITEMSIZE[kind], "base") < 0)
            goto done;
        if (base.len != values.len) {
            PyErr_SetString(PyExc_ValueError, "sort_select: finetuned and base differ in length");
            goto done;
        }
        n = values.len / KIND_ITEMSIZE[kind];
    } else {
        if (get_buffer(values_object, &values, 0, 4, "values") < 0)
            goto done;
        n = values.len / 4;
    }
    if (get_buffer(mask_object, &mask, 1, 1, "mask") < 0)
        goto done;
    if (mask.len != n || lo < 0 || hi < lo || hi > n || n > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "sort_select: mask of another length, bounds outside "
                        "the values or over 2**32 values");
        goto done;
    }
    SortPair *pairs = PyMem_RawMalloc((n ? n : 1) * sizeof(SortPair));
    if (pairs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int done_ok;
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case KIND_BF16: tau_pairs_bf16(values.buf, base.buf, n, pairs); break;
    case KIND_F16: tau_pairs_f16(values.buf, base.buf, n, pairs); break;
    case KIND_F32: tau_pairs_f32(values.buf, base.buf, n, pairs); break;
    case KIND_F64: tau_pairs_f64(values.buf, base.buf, n, pairs); break;
    default: {
        const float *v = values.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            pairs[i].value = v[i];
            pairs[i].index = (uint32_t)i;
        }
    }
    }
    done_ok = descending ? select_loop_desc(pairs, 0, n, depth, lo, hi)
                         : select_loop_asc(pairs, 0, n, depth, lo, hi);
    if (done_ok) {
        uint8_t *out = mask.buf;
        memset(out, 0, n);
        for (Py_ssize_t i = lo; i < hi; i++)
            out[pairs[i].index] = 1;
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(pairs);
    result = PyBool_FromLong(done_ok);
done:
    release(&values);
    release(&base);
    release(&mask);
    return result;
}

PyDoc_STRVAR(gta_mix_doc,
"gta_mix(deltas, count, weights, consensus, normalize, divisor, scale, out)\n"
"\n"
"mergekit's generalized task arithmetic after sparsification, one element at a time in\n"
"the order of its torch operations on ``count`` rows of ``deltas`` (float32 or float64,\n"
"row-major, ``out``'s type): ``weighted = deltas * weights`` (``weights`` float64, each\n"
"cast to the rows' type); with ``consensus`` the sign of ``weighted.sum(0)`` (zero counts\n"
"as +) elects, ``mixed`` and the divisor are the sums of the agreeing weighted values and\n"
"weights (others add ``value * 0``, as a product with a false mask), a zero divisor\n"
"becomes 1; without, ``mixed`` is ``weighted.sum(0)`` and ``divisor`` is given.  Sums run\n"
"from +0.0 in row order, as torch's reduction over the rows does for up to 4 rows (the\n"
"caller's condition).  Then ``mixed /= divisor`` where ``normalize`` and ``mixed *=\n"
"scale`` (where ``scale`` is 1, as torch's skipped product: the same value).  The same bits\n"
"but for a NaN's sign and payload (the combiners make every NaN result canonical).");

/* One element's mix, for a fixed number of rows: each row a variable of its own (the
   conditions on COUNT fold away), so gcc vectorizes the loop across elements; the selects
   are computed both ways and blended, no branch on the data. */
#define GTA_ROW(T, COUNT, k)                                                                           \
    const T *restrict row##k = deltas + (COUNT > k ? k : 0) * size;                         \
    const T w##k = COUNT > k ? (T)weights[k] : zero, dropped_w##k = w##k * zero;
#define GTA_WEIGHTED(T, COUNT, k) T x##k = COUNT > k ? row##k[j] * w##k : zero;
#define GTA_TOTAL(COUNT, k) if (COUNT > k) total += x##k;
#define GTA_AGREE(T, COUNT, k)                                                                         \
    if (COUNT > k) {                                                                         \
        int agree = x##k * sign > zero;                                                      \
        T dropped = x##k * zero;                                                             \
        mixed += agree ? x##k : dropped;                                                     \
        agreeing += agree ? w##k : dropped_w##k;                                             \
    }
/* The loop, with the rule's choices as constants (a loop-invariant select does not vectorize).
   A scale of 1 multiplies too: the same value. */
#define GTA_LOOP(T, COUNT, CONSENSUS, NORMALIZE)                                             \
    for (Py_ssize_t j = 0; j < size; j++) {                                                  \
        GTA_WEIGHTED(T, COUNT, 0) GTA_WEIGHTED(T, COUNT, 1)                                  \
        GTA_WEIGHTED(T, COUNT, 2) GTA_WEIGHTED(T, COUNT, 3)                                  \
        T mixed = zero, total = zero, agreeing = divisor;                                    \
        GTA_TOTAL(COUNT, 0) GTA_TOTAL(COUNT, 1) GTA_TOTAL(COUNT, 2) GTA_TOTAL(COUNT, 3)      \
        if (CONSENSUS) {                                                                     \
            T sign = total >= zero ? one : -one; /* agree: weighted * sign > 0 */            \
            agreeing = zero;                                                                 \
            GTA_AGREE(T, COUNT, 0) GTA_AGREE(T, COUNT, 1)                                    \
            GTA_AGREE(T, COUNT, 2) GTA_AGREE(T, COUNT, 3)                                    \
            agreeing = agreeing == zero ? one : agreeing;                                    \
        } else {                                                                             \
            mixed = total;                                                                   \
        }                                                                                    \
        if (NORMALIZE)                                                                       \
            mixed /= agreeing;                                                               \
        out[j] = mixed * scale;                                                              \
    }
#define DEFINE_GTA_MIX(NAME, T, COUNT)                                                       \
    VECTOR_CLONES static void NAME(const T *restrict deltas, Py_ssize_t size,               \
                                   const T *restrict weights, int consensus, int normalize, \
                                   T divisor, T scale, T *restrict out)                     \
    {                                                                                        \
        const T zero = 0, one = 1;                                                           \
        GTA_ROW(T, COUNT, 0) GTA_ROW(T, COUNT, 1) GTA_ROW(T, COUNT, 2) GTA_ROW(T, COUNT, 3)  \
        if (consensus && normalize)                                                          \
            GTA_LOOP(T, COUNT, 1, 1)                                                         \
        else if (consensus)                                                                  \
            GTA_LOOP(T, COUNT, 1, 0)                                                         \
        else if (normalize)                                                                  \
            GTA_LOOP(T, COUNT, 0, 1)                                                         \
        else                                                                                 \
            GTA_LOOP(T, COUNT, 0, 0)                                                         \
    }

/* Selects between products and quotients that might raise a floating-point flag (no one
   reads the flags) are blended only when gcc may assume no trap: the values are the same. */
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
DEFINE_GTA_MIX(gta_mix_32_1, float, 1)
DEFINE_GTA_MIX(gta_mix_32_2, float, 2)
DEFINE_GTA_MIX(gta_mix_32_3, float, 3)
DEFINE_GTA_MIX(gta_mix_32_4, float, 4)
DEFINE_GTA_MIX(gta_mix_64_1, double, 1)
DEFINE_GTA_MIX(gta_mix_64_2, double, 2)
DEFINE_GTA_MIX(gta_mix_64_3, double, 3)
DEFINE_GTA_MIX(gta_mix_64_4, double, 4)
#pragma GCC pop_options

typedef void (*GtaMix32)(const float *, Py_ssize_t, const float *, int, int, float, float,
                         float *);
typedef void (*GtaMix64)(const double *, Py_ssize_t, const double *, int, int, double, double,
                         double *);
static const GtaMix32 GTA_MIX_32[] = {gta_mix_32_1, gta_mix_32_2, gta_mix_32_3, gta_mix_32_4};
static const GtaMix64 GTA_MIX_64[] = {gta_mix_64_1, gta_mix_64_2, gta_mix_64_3, gta_mix_64_4};

static PyObject *gta_mix(PyObject *self, PyObject *args)
{
    PyObject *deltas_object, *weights_object, *out_object;
    int count, consensus, normalize;
    double divisor, scale;
    if (!PyArg_ParseTuple(args, "OiOppddO", &deltas_object, &count, &weights_object,
                          &consensus, &normalize, &divisor, &scale, &out_object))
        return NULL;
    Py_buffer deltas = {0}, weights = {0}, out = {0};
    PyObject *result = NULL;
    if (PyObject_GetBuffer(out_object, &out, PyBUF_CONTIG) < 0)
        goto done;
    Py_ssize_t itemsize = out.itemsize;
    if (itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_TypeError, "out has %zd-byte items", itemsize);
        goto done;
    }
    if (get_buffer(deltas_object, &deltas, 0, itemsize, "deltas") < 0
        || get_buffer(weights_object, &weights, 0, 8, "weights") < 0)
        goto done;
    Py_ssize_t size = out.len / itemsize;
    if (count < 1 || count > 4 || weights.len != 8 * count
        || deltas.len != (Py_ssize_t)count * size * itemsize) {
        PyErr_SetString(PyExc_ValueError, "gta_mix: 1 to 4 rows of out's length, one weight each");
        goto done;
    }
    const double *weights64 = weights.buf;
    Py_BEGIN_ALLOW_THREADS
    if (itemsize == 4) {
        float cast[4];
        for (int i = 0; i < count; i++)
            cast[i] = (float)weights64[i];
        GTA_MIX_32[count - 1](deltas.buf, size, cast, consensus, normalize, (float)divisor,
                              (float)scale, out.buf);
    } else {
        GTA_MIX_64[count - 1](deltas.buf, size, weights64, consensus, normalize, divisor, scale,
                              out.buf);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&deltas);
    release(&weights);
    release(&out);
    return result;
}

PyDoc_STRVAR(abs_tau_doc,
"abs_tau(kind, finetuned, base, out)\n"
"\n"
"``out`` (float32) = |wide(finetuned) - wide(base)| rounded to float32 where the bits\n"
"differ, +0.0 where they are equal: ``tau.abs().float()`` of the dense task vector that\n"
"merge's dense form builds (``kind`` as for merge_block).");

#define DEFINE_ABS_TAU(NAME, BITS, TO_WIDE, FABS)                                           \
    VECTOR_CLONES static void NAME(const BITS *restrict tune, const BITS *restrict base,    \
                                   Py_ssize_t size, float *restrict out)                    \
    {                                                                                        \
        for (Py_ssize_t j = 0; j < size; j++)                                                \
            out[j] = ABS_TAU(TO_WIDE, FABS, tune[j], base[j]);                               \
    }

#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
DEFINE_ABS_TAU(abs_tau_bf16, uint16_t, bf16_wide, fabsf)
DEFINE_ABS_TAU(abs_tau_f16, uint16_t, f16_wide, fabsf)
DEFINE_ABS_TAU(abs_tau_f32, uint32_t, f32_wide, fabsf)
DEFINE_ABS_TAU(abs_tau_f64, uint64_t, f64_wide, fabs)
#pragma GCC pop_options

static PyObject *abs_tau(PyObject *self, PyObject *args)
{
    int kind;
    PyObject *tune_object, *base_object, *out_object;
    if (!PyArg_ParseTuple(args, "iOOO", &kind, &tune_object, &base_object, &out_object))
        return NULL;
    if (!known_kind(kind))
        return NULL;
    Py_ssize_t itemsize = KIND_ITEMSIZE[kind];
    Py_buffer tune = {0}, base = {0}, out = {0};
    PyObject *result = NULL;
    if (get_buffer(tune_object, &tune, 0, itemsize, "finetuned") < 0
        || get_buffer(base_object, &base, 0, itemsize, "base") < 0
        || get_buffer(out_object, &out, 1, 4, "out") < 0)
        goto done;
    Py_ssize_t size = base.len / itemsize;
    if (tune.len != base.len || out.len != 4 * size) {
        PyErr_SetString(PyExc_ValueError, "abs_tau: finetuned, base and out differ in length");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case KIND_BF16: abs_tau_bf16(tune.buf, base.buf, size, out.buf); break;
    case KIND_F16: abs_tau_f16(tune.buf, base.buf, size, out.buf); break;
    case KIND_F32: abs_tau_f32(tune.buf, base.buf, size, out.buf); break;
    default: abs_tau_f64(tune.buf, base.buf, size, out.buf); break;
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&tune);
    release(&base);
    release(&out);
    return result;
}

PyDoc_STRVAR(gta_merge_changed_doc,
"gta_merge_changed(kind, block, tunes, consensus, normalize, divisor, scale, canonical_nan)\n"
"\n"
"merge's dense form of mergekit's generalized task arithmetic from the bits, without the\n"
"dense task vectors: ``block`` (the base's bits of a float dtype whose wide type is\n"
"float32: ``kind`` bf16, f16 or f32) is merged in place; ``tunes`` is a sequence of 1 to 4\n"
"``(fine-tuned bits, weight, kept, factor)``, ``kept`` uint8 (nonzero: the trim keeps the\n"
"element) and ``factor`` the L1 rescale (1.0 for none).  Each element: tau = wide(fine-tuned)\n"
"- wide(base) where the bits differ, else +0.0; ``tau * kept * factor * weight`` (each a\n"
"float32 product, mergekit's order); then gta_mix's election and mixing; an element some\n"
"fine-tune changed becomes round(wide(base) + mixed) (``canonical_nan`` for a NaN), the\n"
"others keep the base's bits.  The bits of the dense form through mergekit_dense.");

#define GTB_ROW(BITS, COUNT, k)                                                              \
    const BITS *restrict tune##k = tunes[COUNT > k ? k : 0];                                 \
    const uint8_t *restrict kept##k = kept[COUNT > k ? k : 0];                              \
    const float w##k = COUNT > k ? (float)weights[k] : zero, dropped_w##k = w##k * zero,     \
        factor##k = COUNT > k ? (float)factors[k] : one;
/* Selects as bit masks (as ADD_CHANGED): the loop stays one straight line that vectorizes. */
#define GTB_WEIGHTED(COUNT, TO_WIDE, k)                                                      \
    float x##k = zero;                                                                       \
    uint32_t changed##k = 0;                                                                 \
    if (COUNT > k) {                                                                         \
        changed##k = (uint32_t)0 - (uint32_t)(tune##k[j] != b);                              \
        float tau = TO_WIDE(tune##k[j]) - wide_base;                                         \
        uint32_t tau_bits;                                                                   \
        memcpy(&tau_bits, &tau, 4);                                                          \
        tau_bits &= changed##k;                                                              \
        memcpy(&tau, &tau_bits, 4);                                                          \
        x##k = tau * (float)(kept##k[j] != 0) * factor##k * w##k;                             \
    }
#define GTB_TOTAL(COUNT, k) if (COUNT > k) { total += x##k; touched |= changed##k; }
/* GTA_AGREE with bit-mask selects (float only). */
#define GTB_BLEND(MASK, A, B, OUT)                                                           \
    do {                                                                                     \
        float a_ = (A), b_ = (B);                                                            \
        uint32_t a_bits_, b_bits_;                                                           \
        memcpy(&a_bits_, &a_, 4);                                                            \
        memcpy(&b_bits_, &b_, 4);                                                            \
        a_bits_ = (a_bits_ & (MASK)) | (b_bits_ & ~(MASK));                                  \
        memcpy(&(OUT), &a_bits_, 4);                                                         \
    } while (0)
#define GTB_AGREE(COUNT, k)                                                                  \
    if (COUNT > k) {                                                                         \
        uint32_t agree = (uint32_t)0 - (uint32_t)(x##k * sign > zero);                       \
        float mixed_term, weight_term;                                                       \
        GTB_BLEND(agree, x##k, x##k * zero, mixed_term);                                     \
        GTB_BLEND(agree, w##k, dropped_w##k, weight_term);                                   \
        mixed += mixed_term;                                                                 \
        agreeing += weight_term;                                                             \
    }
#define GTB_LOOP(BITS, WBITS, COUNT, TO_WIDE, ROUND, CONSENSUS, NORMALIZE)                  \
    for (Py_ssize_t j = 0; j < size; j++) {                                                  \
        BITS b = block[j];                                                                   \
        float wide_base = TO_WIDE(b);                                                        \
        GTB_WEIGHTED(COUNT, TO_WIDE, 0) GTB_WEIGHTED(COUNT, TO_WIDE, 1)                      \
        GTB_WEIGHTED(COUNT, TO_WIDE, 2) GTB_WEIGHTED(COUNT, TO_WIDE, 3)                      \
        float mixed = zero, total = zero, agreeing = divisor;                                \
        uint32_t touched = 0;                                                                \
        GTB_TOTAL(COUNT, 0) GTB_TOTAL(COUNT, 1) GTB_TOTAL(COUNT, 2) GTB_TOTAL(COUNT, 3)      \
        if (CONSENSUS) {                                                                     \
            float sign;                                                                      \
            GTB_BLEND((uint32_t)0 - (uint32_t)(total >= zero), one, -one, sign);             \
            agreeing = zero;                                                                 \
            GTB_AGREE(COUNT, 0) GTB_AGREE(COUNT, 1) GTB_AGREE(COUNT, 2) GTB_AGREE(COUNT, 3)  \
            uint32_t none_agree = (uint32_t)0 - (uint32_t)(agreeing == zero);                \
            GTB_BLEND(none_agree, one, agreeing, agreeing);                                  \
        } else {                                                                             \
            mixed = total;                                                                   \
        }                                                                                    \
        if (NORMALIZE)                                                                       \
            mixed /= agreeing;                                                               \
        float merged = wide_base + mixed * scale;                                            \
        WBITS rounded = merged != merged ? (WBITS)canonical_nan : (WBITS)ROUND(merged);      \
        WBITS kept_base = (WBITS)~touched;                                                   \
        block[j] = (BITS)((rounded & ~kept_base) | ((WBITS)b & kept_base));                  \
    }
#define DEFINE_GTA_MERGE_CHANGED(NAME, BITS, WBITS, TO_WIDE, ROUND, COUNT)                   \
    VECTOR_CLONES static void NAME(BITS *restrict block, Py_ssize_t size,                   \
                                   const BITS *const *tunes, const uint8_t *const *kept,    \
                                   const double *weights, const double *factors,            \
                                   int consensus, int normalize, float divisor, float scale, \
                                   BITS canonical_nan)                                       \
    {                                                                                        \
        const float zero = 0, one = 1;                                                       \
        GTB_ROW(BITS, COUNT, 0) GTB_ROW(BITS, COUNT, 1)                                      \
        GTB_ROW(BITS, COUNT, 2) GTB_ROW(BITS, COUNT, 3)                                      \
        if (consensus && normalize)                                                          \
            GTB_LOOP(BITS, WBITS, COUNT, TO_WIDE, ROUND, 1, 1)                               \
        else if (consensus)                                                                  \
            GTB_LOOP(BITS, WBITS, COUNT, TO_WIDE, ROUND, 1, 0)                               \
        else if (normalize)                                                                  \
            GTB_LOOP(BITS, WBITS, COUNT, TO_WIDE, ROUND, 0, 1)                               \
        else                                                                                 \
            GTB_LOOP(BITS, WBITS, COUNT, TO_WIDE, ROUND, 0, 0)                               \
    }

#define DEFINE_GTA_MERGE_CHANGED_KIND(PREFIX, BITS, WBITS, TO_WIDE, ROUND)                   \
    DEFINE_GTA_MERGE_CHANGED(PREFIX##_1, BITS, WBITS, TO_WIDE, ROUND, 1)                     \
    DEFINE_GTA_MERGE_CHANGED(PREFIX##_2, BITS, WBITS, TO_WIDE, ROUND, 2)                     \
    DEFINE_GTA_MERGE_CHANGED(PREFIX##_3, BITS, WBITS, TO_WIDE, ROUND, 3)                     \
    DEFINE_GTA_MERGE_CHANGED(PREFIX##_4, BITS, WBITS, TO_WIDE, ROUND, 4)
DEFINE_GTA_MERGE_CHANGED_KIND(gta_changed_bf16, uint16_t, uint32_t, bf16_wide, bf16_round)
DEFINE_GTA_MERGE_CHANGED_KIND(gta_changed_f16, uint16_t, uint32_t, f16_wide, f16_round)
DEFINE_GTA_MERGE_CHANGED_KIND(gta_changed_f32, uint32_t, uint32_t, f32_wide, f32_round)

typedef void (*GtaChanged16)(uint16_t *, Py_ssize_t, const uint16_t *const *,
                             const uint8_t *const *, const double *, const double *, int, int,
                             float, float, uint16_t);
typedef void (*GtaChanged32)(uint32_t *, Py_ssize_t, const uint32_t *const *,
                             const uint8_t *const *, const double *, const double *, int, int,
                             float, float, uint32_t);
static const GtaChanged16 GTA_CHANGED_BF16[] = {gta_changed_bf16_1, gta_changed_bf16_2,
                                                gta_changed_bf16_3, gta_changed_bf16_4};
static const GtaChanged16 GTA_CHANGED_F16[] = {gta_changed_f16_1, gta_changed_f16_2,
                                               gta_changed_f16_3, gta_changed_f16_4};
static const GtaChanged32 GTA_CHANGED_F32[] = {gta_changed_f32_1, gta_changed_f32_2,
                                               gta_changed_f32_3, gta_changed_f32_4};

static PyObject *gta_merge_changed(PyObject *self, PyObject *args)
{
    int kind, consensus, normalize;
    double divisor, scale;
    unsigned long long canonical_nan;
    PyObject *block_object, *tunes_object;
    if (!PyArg_ParseTuple(args, "iOOppddK", &kind, &block_object, &tunes_object, &consensus,
                          &normalize, &divisor, &scale, &canonical_nan))
        return NULL;
    if (kind != KIND_BF16 && kind != KIND_F16 && kind != KIND_F32) {
        PyErr_Format(PyExc_ValueError, "gta_merge_changed: dtype kind %d does not compute in "
                     "float32", kind);
        return NULL;
    }
    Py_ssize_t itemsize = KIND_ITEMSIZE[kind];
    PyObject *sequence = PySequence_Fast(tunes_object, "tunes must be a sequence");
    if (sequence == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(sequence), held = 0;
    Py_buffer block = {0}, views[8] = {{0}};
    const void *tunes[4];
    const uint8_t *kept[4];
    double weights[4], factors[4];
    PyObject *result = NULL;
    if (n < 1 || n > 4) {
        PyErr_SetString(PyExc_ValueError, "gta_merge_changed: 1 to 4 fine-tunes");
        goto done;
    }
    if (get_buffer(block_object, &block, 1, itemsize, "block") < 0)
        goto done;
    for (; held < n; held++) {
        PyObject *bits, *mask;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(sequence, held),
                              "OdOd;a tune is (fine-tuned bits, weight, kept, factor)", &bits,
                              &weights[held], &mask, &factors[held]))
            goto done;
        if (get_buffer(bits, &views[2 * held], 0, itemsize, "fine-tuned bits") < 0)
            goto done;
        if (get_buffer(mask, &views[2 * held + 1], 0, 1, "kept") < 0) {
            release(&views[2 * held]);
            goto done;
        }
        if (views[2 * held].len != block.len || views[2 * held + 1].len != block.len / itemsize) {
            held++;
            PyErr_SetString(PyExc_ValueError, "fine-tuned bits, kept and block differ in length");
            goto done;
        }
        tunes[held] = views[2 * held].buf;
        kept[held] = views[2 * held + 1].buf;
    }
    Py_ssize_t size = block.len / itemsize;
    Py_BEGIN_ALLOW_THREADS
    if (kind == KIND_F32)
        GTA_CHANGED_F32[n - 1](block.buf, size, (const uint32_t *const *)tunes, kept, weights,
                               factors, consensus, normalize, (float)divisor, (float)scale,
                               (uint32_t)canonical_nan);
    else
        (kind == KIND_BF16 ? GTA_CHANGED_BF16 : GTA_CHANGED_F16)[n - 1](
            block.buf, size, (const uint16_t *const *)tunes, kept, weights, factors, consensus,
            normalize, (float)divisor, (float)scale, (uint16_t)canonical_nan);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    for (Py_ssize_t r = 0; r < 2 * held; r++)
        release(&views[r]);
    release(&block);
    Py_DECREF(sequence);
    return result;
}

PyDoc_STRVAR(exponent_counts_doc,
"exponent_counts(kind, base, counts)\n"
"\n"
"Add to ``counts`` (int64, 2**exponent bits bins) how many of the float ``base`` bits\n"
"(``kind`` as for merge_block) have each biased exponent field: the ulp codec's\n"
"np.bincount of its exponent fields.");

/* Four tables side by side: equal exponents in a row (the common case) do not wait on one
   another's increments. */
#define DEFINE_EXPONENT_COUNTS(NAME, BITS, MANTISSA, EXPONENT)                              \
    static void NAME(const BITS *base, Py_ssize_t n, int64_t *counts)                        \
    {                                                                                        \
        enum { BINS = 1 << EXPONENT };                                                       \
        int64_t *tables = PyMem_RawCalloc(4 * BINS, sizeof(int64_t));                        \
        Py_ssize_t i = 0;                                                                    \
        if (tables != NULL) {                                                                \
            for (; i + 4 <= n; i += 4)                                                       \
                for (int t = 0; t < 4; t++)                                                  \
                    tables[t * BINS + ((base[i + t] >> MANTISSA) & (BINS - 1))]++;           \
            for (int b = 0; b < BINS; b++)                                                   \
                counts[b] += tables[b] + tables[BINS + b] + tables[2 * BINS + b]             \
                             + tables[3 * BINS + b];                                         \
            PyMem_RawFree(tables);                                                           \
        }                                                                                    \
        for (; i < n; i++)                                                                   \
            counts[(base[i] >> MANTISSA) & (BINS - 1)]++;                                    \
    }

DEFINE_EXPONENT_COUNTS(exponent_counts_bf16, uint16_t, 7, 8)
DEFINE_EXPONENT_COUNTS(exponent_counts_f16, uint16_t, 10, 5)
DEFINE_EXPONENT_COUNTS(exponent_counts_f32, uint32_t, 23, 8)
DEFINE_EXPONENT_COUNTS(exponent_counts_f64, uint64_t, 52, 11)

static PyObject *exponent_counts(PyObject *self, PyObject *args)
{
    int kind;
    PyObject *base_object, *counts_object;
    if (!PyArg_ParseTuple(args, "iOO", &kind, &base_object, &counts_object))
        return NULL;
    if (!known_kind(kind))
        return NULL;
    static const int BINS[] = {1 << 8, 1 << 5, 1 << 8, 1 << 11};
    Py_buffer base = {0}, counts = {0};
    PyObject *result = NULL;
    if (get_buffer(base_object, &base, 0, KIND_ITEMSIZE[kind], "base") < 0
        || get_buffer(counts_object, &counts, 1, 8, "counts") < 0)
        goto done;
    if (counts.len != 8 * BINS[kind]) {
        PyErr_Format(PyExc_ValueError, "counts must hold %d bins", BINS[kind]);
        goto done;
    }
    Py_ssize_t n = base.len / KIND_ITEMSIZE[kind];
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case KIND_BF16: exponent_counts_bf16(base.buf, n, counts.buf); break;
    case KIND_F16: exponent_counts_f16(base.buf, n, counts.buf); break;
    case KIND_F32: exponent_counts_f32(base.buf, n, counts.buf); break;
    default: exponent_counts_f64(base.buf, n, counts.buf); break;
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&base);
    release(&counts);
    return result;
}

/* lowrank_accumulate(left, right, first_col, acc): acc[r][c] = sum_i left[r][i] *
 * right[i][first_col + c], i ascending from +0.0, every product and sum rounded to the
 * element type (docs/format.md 4.3, lowrank; built with -ffp-contract=off, so no fused
 * multiply-add).  left: n x R, right: R x cols, acc: n x m, all float32 or all float64,
 * C-contiguous.  The loop over c vectorizes: each lane does the spec's scalar operations. */
#define LOWRANK_ACCUMULATE(NAME, T)                                                           \
    VECTOR_CLONES static void NAME(const T *restrict left, const T *restrict right,          \
                                   T *restrict acc, Py_ssize_t n, Py_ssize_t rank,           \
                                   Py_ssize_t cols, Py_ssize_t first, Py_ssize_t m)          \
    {                                                                                         \
        for (Py_ssize_t r = 0; r < n; r++) {                                                  \
            T *restrict out = acc + r * m;                                                    \
            for (Py_ssize_t c = 0; c < m; c++)                                                \
                out[c] = (T)0;                                                                \
            for (Py_ssize_t i = 0; i < rank; i++) {                                           \
                const T a = left[r * rank + i];                                               \
                const T *restrict q = right + i * cols + first;                               \
                for (Py_ssize_t c = 0; c < m; c++) {                                          \
                    T product = a * q[c];                                                     \
                    out[c] = out[c] + product;                                                \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }
LOWRANK_ACCUMULATE(lowrank_accumulate_f32, float)
LOWRANK_ACCUMULATE(lowrank_accumulate_f64, double)

PyDoc_STRVAR(lowrank_accumulate_doc,
             "lowrank_accumulate(left, right, first_col, acc): the lowrank codec's sums in "
             "the spec's order (float32 or float64 arrays, C-contiguous).");

static PyObject *lowrank_accumulate(PyObject *self, PyObject *args)
{
    PyObject *left_object, *right_object, *acc_object;
    Py_ssize_t first;
    if (!PyArg_ParseTuple(args, "OOnO", &left_object, &right_object, &first, &acc_object))
        return NULL;
    Py_buffer left = {0}, right = {0}, acc = {0};
    PyObject *result = NULL;
    if (PyObject_GetBuffer(left_object, &left, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND) < 0
        || PyObject_GetBuffer(right_object, &right, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND) < 0
        || PyObject_GetBuffer(acc_object, &acc,
                              PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND | PyBUF_WRITABLE) < 0)
        goto done;
    if (left.ndim != 2 || right.ndim != 2 || acc.ndim != 2 || left.itemsize != right.itemsize
        || left.itemsize != acc.itemsize || (left.itemsize != 4 && left.itemsize != 8)
        || strcmp(left.format, right.format) || strcmp(left.format, acc.format)
        || (strcmp(left.format, "f") && strcmp(left.format, "d"))) {
        PyErr_SetString(PyExc_ValueError, "lowrank_accumulate takes 2-d float32 or float64 "
                                          "arrays of one type");
        goto done;
    }
    Py_ssize_t n = left.shape[0], rank = left.shape[1], cols = right.shape[1];
    Py_ssize_t m = acc.shape[1];
    if (right.shape[0] != rank || acc.shape[0] != n || first < 0 || first > cols
        || m > cols - first) {
        PyErr_SetString(PyExc_ValueError, "lowrank_accumulate: shapes do not agree");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (left.itemsize == 4)
        lowrank_accumulate_f32(left.buf, right.buf, acc.buf, n, rank, cols, first, m);
    else
        lowrank_accumulate_f64(left.buf, right.buf, acc.buf, n, rank, cols, first, m);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    if (left.obj) PyBuffer_Release(&left);
    if (right.obj) PyBuffer_Release(&right);
    if (acc.obj) PyBuffer_Release(&acc);
    return result;
}

static PyMethodDef methods[] = {
    {"merge_block", merge_block, METH_VARARGS, merge_block_doc},
    {"merge_changed", merge_changed, METH_VARARGS, merge_changed_doc},
    {"f16_convert", f16_convert, METH_VARARGS, f16_convert_doc},
    {"from_planes", from_planes, METH_VARARGS, from_planes_doc},
    {"gap_decode", gap_decode, METH_VARARGS, gap_decode_doc},
    {"bitmap_positions", bitmap_positions, METH_VARARGS, bitmap_positions_doc},
    {"bitmap_count", bitmap_count, METH_VARARGS, bitmap_count_doc},
    {"bitmap_move", bitmap_move, METH_VARARGS, bitmap_move_doc},
    {"strictly_increasing", strictly_increasing, METH_VARARGS, strictly_increasing_doc},
    {"magnitude_keys", magnitude_keys, METH_VARARGS, magnitude_keys_doc},
    {"keyed_histogram", keyed_histogram, METH_VARARGS, keyed_histogram_doc},
    {"quant_fit", quant_fit, METH_VARARGS, quant_fit_doc},
    {"quant_fit_bits", quant_fit_bits, METH_VARARGS, quant_fit_bits_doc},
    {"key_counts", key_counts, METH_VARARGS, key_counts_doc},
    {"count_unequal", count_unequal, METH_VARARGS, count_unequal_doc},
    {"sort_select", sort_select, METH_VARARGS, sort_select_doc},
    {"gta_mix", gta_mix, METH_VARARGS, gta_mix_doc},
    {"exponent_counts", exponent_counts, METH_VARARGS, exponent_counts_doc},
    {"abs_tau", abs_tau, METH_VARARGS, abs_tau_doc},
    {"lowrank_accumulate", lowrank_accumulate, METH_VARARGS, lowrank_accumulate_doc},
    {"gta_merge_changed", gta_merge_changed, METH_VARARGS, gta_merge_changed_doc},
    {"quant_non_finite", quant_non_finite, METH_VARARGS, quant_non_finite_doc},
    {"select_at_least", select_at_least, METH_VARARGS, select_at_least_doc},
    {"key_histogram", key_histogram, METH_VARARGS, key_histogram_doc},
    {"keys_at_least", keys_at_least, METH_VARARGS, keys_at_least_doc},
    {"rice_decode", rice_decode, METH_VARARGS, rice_decode_doc},
    {"rice_decode_at", rice_decode_at, METH_VARARGS, rice_decode_at_doc},
    {"rice_encode", rice_encode, METH_VARARGS, rice_encode_doc},
    {"tau_decode", tau_decode, METH_VARARGS, tau_decode_doc},
    {"ulp_decode", ulp_decode, METH_VARARGS, ulp_decode_doc},
    {"ulp_encode", ulp_encode, METH_VARARGS, ulp_encode_doc},
    {"quant_assign", quant_assign, METH_VARARGS, quant_assign_doc},
    {"quant_restore", quant_restore, METH_VARARGS, quant_restore_doc},
    {"select_bracket", select_bracket, METH_VARARGS, select_bracket_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sparsestitch._native",
    "The stitcher's per-position loops in C (see sparsestitch/native.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    merge_words_init();
    return PyModule_Create(&module);
}
