/* dq's CPU kernels: the element-wise passes of a deployed layer, each fused into one call.
 *
 * Compiled on first use by dq/kernels/cpu_kernels.py (gcc -O3 -march=native -ffp-contract=off -fopenmp) and called
 * through ctypes. Every function computes exactly what the torch reference computes (dq.kernels.reference,
 * dq.quant.fake, dq.quant.storage), in the same order of IEEE float32 operations: division where the reference
 * divides, round half to even, no fused multiply-add. So results are bit-identical, and only the number of
 * passes over memory and of dispatches changes (one call instead of 4-10 torch ops).
 *
 * Shapes are row-major; `ld*` is a row stride in elements. Scales and other small tensors come with a dtype code:
 * 0 float32, 1 float16, 2 uint8, 3 bfloat16 (each converts to float32 exactly).
 */

#include <float.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef int64_t i64;

/* Loops over rows, images and weight rows run on torch's OpenMP threads (the library links libgomp.so.1, which
 * resolves to the copy torch has loaded) when they have at least this many elements: a serial pass between two
 * parallel GEMMs leaves torch's other threads idle and costs more than its own time. */
#define PARALLEL_MIN 16384

enum { DTYPE_F32 = 0, DTYPE_F16 = 1, DTYPE_U8 = 2, DTYPE_BF16 = 3 };

/* IEEE half -> float, exact (normals, subnormals, zeros, inf and NaN). */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; --exp; }
        bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float load_scale(const void *p, int dtype, i64 i) {
    switch (dtype) {
    case DTYPE_F16: return half_to_float(((const uint16_t *)p)[i]);
    case DTYPE_U8: return (float)((const uint8_t *)p)[i];
    case DTYPE_BF16: {
        uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    default: return ((const float *)p)[i];
    }
}

/* dst [n] = src [n] of dtype code `dtype`, as float32 (exact). Half floats eight at a time with F16C where the
 * CPU has it (as torch's own vectorized conversion does): per element, half_to_float costs ten times more. */
static void to_float(const void *src, int dtype, i64 n, float *dst) {
    i64 i = 0;
#ifdef __F16C__
    if (dtype == DTYPE_F16) {
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i))));
    }
#endif
    for (; i < n; ++i) dst[i] = load_scale(src, dtype, i);
}

/* The absmax scale of n values, as dq.quant.spec.dynamic_scales: max(amax / qmax, smallest normal).
 * Eight running maxima (compilers do not vectorize a max reduction without -ffast-math); max is exact, so
 * the order does not change the result. */
static float absmax_scale(const float *v, i64 n, float qmax) {
    float amax = 0.0f;
    i64 j = 0;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    for (; j + 8 <= n; j += 8) acc = _mm256_max_ps(acc, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + j)));
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int l = 0; l < 8; ++l) amax = lanes[l] > amax ? lanes[l] : amax;
#endif
    for (; j < n; ++j) {
        float a = fabsf(v[j]);
        amax = a > amax ? a : amax;
    }
    float s = amax / qmax;
    return s < FLT_MIN ? FLT_MIN : s;
}

/* Dynamic symmetric fake quantization of each row of x [m, k] in groups of `group` columns (group divides k),
 * onto the signed integer grid with largest code qmax: out [m, k] = code * scale (dq.quant.fake_quantize).
 * smooth [k] or NULL: the row is first divided by it; `smoothed` [m, k] (or NULL) receives those values.
 * The clamp is skipped as in the reference (_grid_no_grad, scale_from_g): with absmax scales no code
 * exceeds qmax. */
void dq_quantize_rows(const float *x, i64 m, i64 k, i64 ldx, const float *smooth, float *smoothed,
                      i64 group, float qmax, float *out) {
#pragma omp parallel for schedule(static) if (m * k >= PARALLEL_MIN)
    for (i64 r = 0; r < m; ++r) {
        const float *v = x + r * ldx;
        float *o = out + r * k;
        if (smooth != NULL) {
            float *dst = smoothed != NULL ? smoothed + r * k : o;
            for (i64 j = 0; j < k; ++j) dst[j] = v[j] / smooth[j];
            v = dst;
        }
        for (i64 g = 0; g < k; g += group) {
            float s = absmax_scale(v + g, group, qmax);
            for (i64 j = g; j < g + group; ++j) o[j] = rintf(v[j] / s) * s;
        }
    }
}

/* Dynamic symmetric fake quantization of x [n, c, hw] whose tokens are its pixels: one scale per pixel and
 * group of `group` channels (dq.quant.fake_quantize_channels). Pixels go in chunks that stay in the cache. */
#define PIXEL_CHUNK 256
void dq_quantize_channels(const float *x, i64 n, i64 c, i64 hw, i64 group, float qmax, float *out) {
#pragma omp parallel for collapse(2) schedule(static) if (n * c * hw >= PARALLEL_MIN)
    for (i64 b = 0; b < n; ++b) {
        for (i64 g = 0; g < c; g += group) {
            float amax[PIXEL_CHUNK];
            for (i64 p0 = 0; p0 < hw; p0 += PIXEL_CHUNK) {
                i64 np = hw - p0 < PIXEL_CHUNK ? hw - p0 : PIXEL_CHUNK;
                const float *xs = x + (b * c + g) * hw + p0;
                float *os = out + (b * c + g) * hw + p0;
                for (i64 p = 0; p < np; ++p) amax[p] = 0.0f;
                for (i64 ch = 0; ch < group; ++ch) {
                    const float *row = xs + ch * hw;
                    for (i64 p = 0; p < np; ++p) {
                        float a = fabsf(row[p]);
                        amax[p] = a > amax[p] ? a : amax[p];
                    }
                }
                for (i64 p = 0; p < np; ++p) {
                    float s = amax[p] / qmax;
                    amax[p] = s < FLT_MIN ? FLT_MIN : s;
                }
                for (i64 ch = 0; ch < group; ++ch) {
                    const float *row = xs + ch * hw;
                    float *orow = os + ch * hw;
                    for (i64 p = 0; p < np; ++p) orow[p] = rintf(row[p] / amax[p]) * amax[p];
                }
            }
        }
    }
}

/* Stored weight codes -> float32 out [n, k] (dq.quant.storage.dequantize_stored, dq.kernels.reference.weight_operand).
 *
 * bits 8: q is int8 (is_signed) or uint8 [n, ldq]; bits <= 4: q is uint8 [n, ldq] holding two codes per byte,
 * element 2i in the low nibble, two's complement when is_signed (dq.quant.packing).
 * out = (code - zero) * scale, group by group along k, with scale and zero [scale_rows, groups] (scale_rows is
 * n or 1; zero may be NULL); then times channel [n] (float16, or NULL): the s1 of progressive weights.
 */
void dq_decode_weight(const void *q, i64 n, i64 k, i64 ldq, int bits, int is_signed, const void *scale, const void *zero,
                      int scale_dtype, i64 scale_rows, i64 groups, const uint16_t *channel, float *out) {
    i64 group = k / groups;
#pragma omp parallel for schedule(static) if (n * k >= PARALLEL_MIN)
    for (i64 r = 0; r < n; ++r) {
        float *o = out + r * k;
        if (bits == 8) {
            if (is_signed) {
                const int8_t *row = (const int8_t *)q + r * ldq;
                for (i64 j = 0; j < k; ++j) o[j] = (float)row[j];
            } else {
                const uint8_t *row = (const uint8_t *)q + r * ldq;
                for (i64 j = 0; j < k; ++j) o[j] = (float)row[j];
            }
        } else {
            const uint8_t *row = (const uint8_t *)q + r * ldq;
            int offset = is_signed ? 8 : 0; /* (nibble ^ 8) - 8 sign-extends a two's complement nibble */
            for (i64 j = 0; j < k / 2; ++j) {
                int lo = row[j] & 0xF, hi = row[j] >> 4;
                o[2 * j] = (float)((lo ^ offset) - offset);
                o[2 * j + 1] = (float)((hi ^ offset) - offset);
            }
        }
        i64 srow = scale_rows == 1 ? 0 : r;
        for (i64 g = 0; g < groups; ++g) {
            float s = load_scale(scale, scale_dtype, srow * groups + g);
            float *og = o + g * group;
            if (zero != NULL) {
                float z = load_scale(zero, scale_dtype, srow * groups + g);
                for (i64 j = 0; j < group; ++j) og[j] = (og[j] - z) * s;
            } else {
                for (i64 j = 0; j < group; ++j) og[j] *= s;
            }
        }
        if (channel != NULL) {
            float c = half_to_float(channel[r]);
            for (i64 j = 0; j < k; ++j) o[j] *= c;
        }
    }
}

/* The BLAS sgemm torch computes F.linear with (dq_set_sgemm: cpu_kernels.py passes the one libtorch_cpu exports). */
typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);
static sgemm_fn sgemm = NULL;

void dq_set_sgemm(void *fn) { sgemm = (sgemm_fn)fn; }

/* y [m, n] = a [m, k] (row stride lda) b [n, k]^T + beta y, as torch's addmm calls BLAS for F.linear: in column-major
 * terms y^T = b a^T, transa "t", transb "n". Same call, same arguments, so the same float32 result. */
static void gemm_abt(i64 m, i64 n, i64 k, const float *a, i64 lda, const float *b, float beta, float *y) {
    int M = (int)m, N = (int)n, K = (int)k, LDA = (int)lda, LDB = (int)k, LDC = (int)n;
    float one = 1.0f;
    sgemm("t", "n", &N, &M, &K, &one, b, &LDB, a, &LDA, &beta, y, &LDC);
}

/* A deployed linear layer in one call (dq.kernels.cpu_linear): y [m, n] = xa w^T + bias + (xs down^T) up^T.
 *
 * x [m, k] is smoothed and fake-quantized into xa (when qmax > 0; only smoothed otherwise; used as it is without
 * smooth), the weight dequantized into w [n, k], then the GEMMs of F.linear(xa, w, bias) and, with rank > 0, of
 * F.linear(xs, down) into t [m, rank] and y.addmm_(t, up^T); xs is the smoothed input (`smoothed` when the input
 * is also quantized). Tensors of 16-bit dtypes are converted to float32 first, as the torch path casts them:
 * smooth_src [k] into smooth (else smooth is the float32 vector itself, or NULL), and the low-rank factors
 * down_src [rank, k] and up_src [n, rank] into down and up (when down_src is not NULL). bias [n] float32 or NULL.
 */
void dq_linear(const float *x, i64 m, i64 k, i64 ldx, const void *smooth_src, int smooth_dtype, float *smooth,
               float *smoothed, i64 group, float qmax, float *xa, const void *q, i64 n, i64 ldq, int bits, int is_signed,
               const void *scale, const void *zero, int scale_dtype, i64 scale_rows, i64 groups, const uint16_t *channel,
               float *w, const float *bias, const void *down_src, const void *up_src, int branch_dtype, i64 rank,
               float *down, float *up, float *t, float *y) {
    if (m == 0) return;
    if (smooth_src != NULL) to_float(smooth_src, smooth_dtype, k, smooth);
    if (down_src != NULL) {
        to_float(down_src, branch_dtype, rank * k, down);
        to_float(up_src, branch_dtype, n * rank, up);
    }
    const float *a = x, *xs = x;
    i64 lda = ldx;
    if (qmax > 0) {
        dq_quantize_rows(x, m, k, ldx, smooth, smoothed, group, qmax, xa);
        a = xa, lda = k, xs = smooth != NULL ? smoothed : x;
    } else if (smooth != NULL) {
#pragma omp parallel for schedule(static) if (m * k >= PARALLEL_MIN)
        for (i64 r = 0; r < m; ++r)
            for (i64 j = 0; j < k; ++j) xa[r * k + j] = x[r * ldx + j] / smooth[j];
        a = xs = xa, lda = k;
    }
    dq_decode_weight(q, n, k, ldq, bits, is_signed, scale, zero, scale_dtype, scale_rows, groups, channel, w);
    if (bias != NULL) {
#pragma omp parallel for schedule(static) if (m * n >= PARALLEL_MIN)
        for (i64 r = 0; r < m; ++r) memcpy(y + r * n, bias, (size_t)n * sizeof(float));
    }
    gemm_abt(m, n, k, a, lda, w, bias != NULL ? 1.0f : 0.0f, y);
    if (rank > 0) {
        gemm_abt(m, rank, k, xs, xs == x ? ldx : k, down, 0.0f, t);
        gemm_abt(m, n, rank, t, rank, up, 1.0f, y);
    }
}

/* A deployed convolution's two operands in one call: x [n, c, hw] fake-quantized per pixel into xq (when qmax > 0),
 * the weight [out, k] dequantized into w. */
void dq_conv_operands(const float *x, i64 n, i64 c, i64 hw, i64 group, float qmax, float *xq, const void *q, i64 out,
                      i64 k, i64 ldq, int bits, int is_signed, const void *scale, const void *zero, int scale_dtype,
                      i64 scale_rows, i64 groups, const uint16_t *channel, float *w) {
    if (qmax > 0) dq_quantize_channels(x, n, c, hw, group, qmax, xq);
    dq_decode_weight(q, out, k, ldq, bits, is_signed, scale, zero, scale_dtype, scale_rows, groups, channel, w);
}
