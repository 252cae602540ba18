/* Shared by the C kernels of sparse_mae_kernels (one .c per op, compiled into one library).
 *
 * Element types: every feature pointer comes with a dtype code (DT_F32 or DT_BF16), so one
 * kernel reads and writes bf16 directly, with no cast before or after it. Arithmetic is
 * float32 throughout; bf16 stores round to nearest even (as torch does).
 *
 * Vectors: GCC/Clang vector extensions of VL floats, VL the width of one register of the
 * target: 16 with AVX-512, else 8 (one AVX2 register; two on SSE2 or NEON). A vector wider
 * than the registers would be split by the compiler through the stack, costing more than
 * the arithmetic. So the kernels are portable C that vectorise on every compiler we build
 * with. Loops run over channels in steps of VL; the last step of a channel count that is
 * not a multiple of VL loads and stores a partial vector (zero-filled).
 */
#ifndef SPARSE_MAE_COMMON_H
#define SPARSE_MAE_COMMON_H

#include <stdint.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1 };
/* 7x7 depthwise taps, k = (dy + 3) * 7 + (dx + 3): passed as -DTAPS by cpu_build.py from
 * sparse_mae_kernels.constants, where it is defined once */
#ifndef TAPS
#error "compile with -DTAPS=<taps of the depthwise kernel> (cpu_build.py does)"
#endif

/* AVX-512 where the compiler targets it (masked partial loads and stores, the bf16
 * conversion instruction, a reciprocal estimate); AVX2's masked loads and stores for
 * partial float vectors; portable vector C otherwise. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HAVE_AVX512 1
#endif
#if defined(HAVE_AVX512) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifdef HAVE_AVX512
#define VL 16
#define LANE_INDEX {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
#else
#define VL 8
#define LANE_INDEX {0, 1, 2, 3, 4, 5, 6, 7}
#endif

typedef float vf __attribute__((vector_size(4 * VL)));
typedef uint32_t vu __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef uint16_t vh __attribute__((vector_size(2 * VL)));

static inline vf vsplat(float a) { return (vf){0} + a; }

/* C has no vector ?: (GCC offers it in C++ only): select bitwise. mask lanes are 0 or -1. */
static inline vf vselect(vi mask, vf if_true, vf if_false) {
  return (vf)(((vi)if_true & mask) | ((vi)if_false & ~mask));
}
static inline vf vmin(vf a, vf b) { return vselect(a < b, a, b); }
static inline vf vmax(vf a, vf b) { return vselect(a > b, a, b); }
static inline vf vabs(vf a) { return (vf)((vi)a & 0x7fffffff); }

static inline float vsum(vf v) {
#ifdef HAVE_AVX512
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.0f;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
#endif
}

/* 1 / q to float precision (an estimate refined by one Newton step where AVX-512 has it) */
static inline vf vrecip(vf q) {
#ifdef HAVE_AVX512
  vf r = (vf)_mm512_rcp14_ps((__m512)q);
  return r * (2.0f - q * r);
#else
  return 1.0f / q;
#endif
}

static inline vf bf16_to_f32(vh h) {
#ifdef HAVE_AVX512
  /* one widening move (GCC 12 lowers __builtin_convertvector here to four instructions) */
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16);
#else
  vu u = __builtin_convertvector(h, vu) << 16;
  return (vf)u;
#endif
}

/* round to nearest even, as c10::BFloat16 (NaN stays NaN) */
static inline vh f32_to_bf16(vf f) {
#if defined(HAVE_AVX512) && defined(__AVX512BF16__)
  return (vh)_mm512_cvtneps_pbh((__m512)f);
#else
  vu u = (vu)f;
  vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  vi is_nan = (vi)((u & 0x7fffffffu) > 0x7f800000u);
  rounded = (rounded & ~(vu)is_nan) | (0x7fc0u & (vu)is_nan);
  return __builtin_convertvector(rounded, vh);
#endif
}

/* n (1..VL) elements of a (dtype dt) starting at element i; the rest zero */
static inline vf vload(const void *a, int dt, long i, int n) {
#ifdef HAVE_AVX512
  const __mmask16 k = n >= VL ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
  if (dt == DT_F32) return (vf)_mm512_maskz_loadu_ps(k, (const float *)a + i);
  return bf16_to_f32((vh)_mm256_maskz_loadu_epi16(k, (const uint16_t *)a + i));
#else
  /* a whole vector: copies of a constant size compile to plain vector loads (a copy of n
   * elements would be a call to memcpy per vector) */
  if (n >= VL) {
    if (dt == DT_F32) {
      vf v;
      memcpy(&v, (const float *)a + i, sizeof v);
      return v;
    }
    vh h;
    memcpy(&h, (const uint16_t *)a + i, sizeof h);
    return bf16_to_f32(h);
  }
#ifdef __AVX2__
  if (dt == DT_F32) { /* AVX's masked load: lanes masked off are not read */
    const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return (vf)_mm256_maskload_ps((const float *)a + i, k);
  }
#endif
  if (dt == DT_F32) {
    vf v = vsplat(0.0f);
    memcpy(&v, (const float *)a + i, sizeof(float) * n);
    return v;
  }
  vh h = {0};
  memcpy(&h, (const uint16_t *)a + i, sizeof(uint16_t) * n);
  return bf16_to_f32(h);
#endif
}

static inline void vstore(void *a, int dt, long i, int n, vf v) {
#ifdef HAVE_AVX512
  const __mmask16 k = n >= VL ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
  if (dt == DT_F32) _mm512_mask_storeu_ps((float *)a + i, k, (__m512)v);
  else _mm256_mask_storeu_epi16((uint16_t *)a + i, k, (__m256i)f32_to_bf16(v));
#else
  if (n >= VL) { /* as vload: a constant size is a plain vector store */
    if (dt == DT_F32) {
      memcpy((float *)a + i, &v, sizeof v);
    } else {
      vh h = f32_to_bf16(v);
      memcpy((uint16_t *)a + i, &h, sizeof h);
    }
    return;
  }
#ifdef __AVX2__
  if (dt == DT_F32) {
    const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_ps((float *)a + i, k, (__m256)v);
    return;
  }
#endif
  if (dt == DT_F32) {
    memcpy((float *)a + i, &v, sizeof(float) * n);
  } else {
    vh h = f32_to_bf16(v);
    memcpy((uint16_t *)a + i, &h, sizeof(uint16_t) * n);
  }
#endif
}

/* the value as stored in dtype dt and read back (bf16 rounding), for kernels that must
 * compute from the rounded value the way a separate op would */
static inline vf vround(int dt, vf v) { return dt == DT_F32 ? v : bf16_to_f32(f32_to_bf16(v)); }

static inline float load1(const void *a, int dt, long i) {
  if (dt == DT_F32) return ((const float *)a)[i];
  uint32_t u = (uint32_t)((const uint16_t *)a)[i] << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline int chunk(long C, long c0) { return C - c0 >= VL ? VL : (int)(C - c0); }

/* lanes [0, n) set: keeps a partial vector's padding out of sums that do not vanish at 0 */
static inline vi lanes_below(int n) { return (vi)LANE_INDEX < n; }

/* first row of the segment holding row m: offsets (N + 1) rising from 0 to M */
static inline long segment_of(const int64_t *offsets, long N, long m) {
  long lo = 0, hi = N - 1; /* the last n with offsets[n] <= m */
  while (lo < hi) {
    long mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= m) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/* LayerNorm of one row already in floats (rows_layernorm.c): z = (row - mean) * rstd * w + b
 * stored at z + zoff in dtype zdt; *mean and *rstd set */
void layernorm_row_forward(const float *row, long C, const float *w, const float *b, float eps, void *z, int zdt,
                           long zoff, float *mean, float *rstd);

/* erf on floats: x * P(x^2) / Q(x^2) on |x| <= 4 (erf(4) = 1 - 1.5e-8), a rational fit made
 * for this project; max abs error 3.6e-7 in float32. The polynomials are evaluated in
 * Estrin's scheme (a short dependency chain: the GELU kernels are latency-bound). */
static inline vf verf(vf x) {
  vf a = vmin(vabs(x), vsplat(4.0f));
  vf t = a * a, t2 = t * t, t4 = t2 * t2;
  vf p = (1.1283791e+00f + 2.0004349e-01f * t) + t2 * (5.0575080e-02f + 3.6998384e-03f * t) +
         t4 * ((1.4126522e-04f - 1.9421870e-06f * t) + 1.9671923e-08f * t2);
  vf q = (1.0f + 5.1061572e-01f * t) + t2 * (1.1503457e-01f + 1.4354063e-02f * t) + t4 * 9.5392189e-04f;
  vf r = vmin(a * p * vrecip(q), vsplat(1.0f));
  return (vf)((vi)r | ((vi)x & (int32_t)0x80000000)); /* erf is odd: x's sign */
}

/* exp on floats: 2^k * e^r, |r| <= ln2/2, degree-6 Taylor for e^r (rel. error < 2e-7) */
static inline vf vexp(vf x) {
  x = vmax(vmin(x, vsplat(88.0f)), vsplat(-87.0f));
  vf k = (x * 1.44269504f + 12582912.0f) - 12582912.0f; /* round to nearest (1.5 * 2^23 trick) */
  vf r = x - k * 0.693145752f - k * 1.42860677e-06f;    /* ln 2 split hi + lo */
  vf r2 = r * r, r4 = r2 * r2;
  vf p = (1.0f + r) + r2 * (0.5f + r * (1.0f / 6.0f)) + r4 * ((1.0f / 24.0f + r * (1.0f / 120.0f)) + r2 * (1.0f / 720.0f));
#ifdef HAVE_AVX512
  return (vf)_mm512_scalef_ps((__m512)p, (__m512)k); /* p * 2^k in one instruction */
#else
  vi bits = (__builtin_convertvector(k, vi) + 127) << 23;
  return p * (vf)bits;
#endif
}

/* GELU (exact, erf form): gelu(x) = x * cdf(x), gelu'(x) = cdf(x) + x * pdf(x). One cdf
 * function for the forward and the backward, so both compute the same v = x * cdf. */
static inline vf vgelu_cdf(vf x) { return 0.5f + 0.5f * verf(x * 0.70710678f); }
static inline vf vgelu_grad(vf x, vf cdf) { return cdf + x * 0.39894228f * vexp(-0.5f * x * x); }

/* -- threads ---------------------------------------------------------------------------
 * pool_run(fn, ctx, n) runs fn(ctx, t, n') for t = 0..n'-1, t = 0 on the calling thread,
 * the others on persistent workers (created on first use, asleep between calls), and
 * returns n' when all are done: n, or fewer if the system refused threads. Work is split
 * by t only, so results depend on n', not on timing; kernels that write one partial sum
 * per thread return n' so the caller sums exactly those. */
typedef void (*task_fn)(void *ctx, int t, int n);
int pool_run(task_fn fn, void *ctx, int n);

/* threads worth using for `rows` rows: at most `threads`, at least `min_rows` rows each */
static inline int threads_for(long rows, int threads, long min_rows) {
  long by_size = rows / min_rows;
  int n = threads < 1 ? 1 : threads;
  if (by_size < n) n = by_size < 1 ? 1 : (int)by_size;
  return n;
}

static inline long split_start(long total, int t, int n) { return total * t / n; }

#endif
