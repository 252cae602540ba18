/* Gathered convolution on packed rows: the C half of ops/rows_gather_conv.py (plain-torch
 * reference: rows_gather_conv_reference there).
 *
 *   nbr (M_out, K) int32: the row of x read at tap k for output row m, -1 where absent
 *   gather (im2col)  cols[m, k*C + c] = x[nbr[m, k], c], zeros where absent
 *   scatter (col2im) gx[nbr[m, k], c] += cols[m, k*C + c]
 *
 * The convolution is one GEMM on the gathered columns (torch.mm, oneDNN), and so is each
 * gradient; the input gradient either gathers grad y through the transposed map or
 * scatters the columns' gradient back (the Python side says when and why).
 *
 * Two forwards: a fused gather-GEMM (below) for small weights, else the gather and oneDNN's
 * GEMM (86-99% of their time at ResNet-50's later shapes, benchmarks/gather_conv.py --split).
 * The gather is a copy, so any element type goes through unchanged (bf16 stays bf16: no
 * conversion pass): each (row, tap) is one contiguous copy of C elements, which the C
 * library does with the widest vector moves of the CPU. Rows are split evenly over the
 * pool's threads. */
#include <string.h>

#include "common.h"

#define MIN_ROWS_PER_THREAD 256 /* a (row, tap) copy is ~C bytes; below this a thread costs more than it saves */
#define MIN_BLOCKS_PER_THREAD 8 /* fused row blocks: each is FUSED_ROWS x K x C x C_out multiply-adds */

typedef struct {
  const char *x;
  const int32_t *nbr;
  char *cols;
  long M, K, row_bytes; /* row_bytes: C * element size */
} gather_args;

static void gather_task(void *ctx, int t, int n) {
  const gather_args *a = ctx;
  const long m0 = split_start(a->M, t, n), m1 = split_start(a->M, t + 1, n);
  for (long m = m0; m < m1; ++m) {
    const int32_t *nb = a->nbr + m * a->K;
    char *dst = a->cols + m * a->K * a->row_bytes;
    for (long k = 0; k < a->K; ++k, dst += a->row_bytes) {
      if (nb[k] >= 0) memcpy(dst, a->x + (long)nb[k] * a->row_bytes, a->row_bytes);
      else memset(dst, 0, a->row_bytes);
    }
  }
}

/* cols (M, K * C) = x rows gathered through nbr (M, K); elements of `element_size` bytes.
 * nbr's values must lie in [-1, rows of x) (the caller checks). */
void rows_gather_cols(const void *x, const int32_t *nbr, void *cols, long M, long K, long C, long element_size,
                      int threads) {
  gather_args a = {.x = x, .nbr = nbr, .cols = cols, .M = M, .K = K, .row_bytes = C * element_size};
  pool_run(gather_task, &a, threads_for(M, threads, MIN_ROWS_PER_THREAD));
}

/* col2im: grad x (M_in, C) float32 = the columns' gradient (M_out, K * C) summed back into the
 * rows nbr names. Each thread owns a slice of the channels, so no two threads write one
 * element: no atomics, and every sum runs in (m, k) order whatever the thread count
 * (deterministic). gx must be zeroed by the caller. */
typedef struct {
  const void *cols;
  int cdt;
  const int32_t *nbr;
  float *gx;
  long M, K, C;
} scatter_args;

static void scatter_task(void *ctx, int t, int n) {
  const scatter_args *a = ctx;
  const long vectors = (a->C + VL - 1) / VL;
  const long c0 = split_start(vectors, t, n) * VL, c_end = split_start(vectors, t + 1, n) * VL;
  const long c1 = c_end < a->C ? c_end : a->C;
  for (long m = 0; m < a->M; ++m) {
    const int32_t *nb = a->nbr + m * a->K;
    for (long k = 0; k < a->K; ++k) {
      if (nb[k] < 0) continue;
      float *dst = a->gx + (long)nb[k] * a->C;
      const long src = (m * a->K + k) * a->C;
      for (long c = c0; c < c1; c += VL) {
        const int lanes = chunk(c1, c);
        vstore(dst, DT_F32, c, lanes, vload(dst, DT_F32, c, lanes) + vload(a->cols, a->cdt, src + c, lanes));
      }
    }
  }
}

void rows_scatter_cols(const void *cols, int cdt, const int32_t *nbr, float *gx, long M, long K, long C, int threads) {
  scatter_args a = {.cols = cols, .cdt = cdt, .nbr = nbr, .gx = gx, .M = M, .K = K, .C = C};
  const long vectors = (C + VL - 1) / VL;
  pool_run(scatter_task, &a, threads_for(vectors, threads, 1));
}


/* Fused gather-GEMM (AVX-512): y[m, o] = sum_k sum_i x[nbr[m, k], i] * w[k, i, o], the gathered
 * rows read in place, never written out. Blocks of FUSED_ROWS output rows x 32 output channels
 * keep 2 * FUSED_ROWS accumulators in registers; each step broadcasts one input channel of each
 * row (bf16: a pair, for one AVX512-BF16 dot product of 2 channels) against 32 channels of the
 * packed weight. It streams the whole weight once per row block, so it wins only while the
 * weight stays in cache (the Python side sends only small weights here). Measured on one Zen 4
 * core against gather + oneDNN at ResNet-50's shapes, batch 8, mask 0.6 (ms): bf16 stem 6.7 vs
 * 9.9, 56x56x64 3x3 4.0 vs 5.3, 28x28x128 3.8 vs 4.0, the 256 -> 512 1x1 stride-2 4.0 vs 3.4;
 * a standalone run at 7x7x512 (4.7 MB of weight) 5.0 vs 3.9. fp32: stem 11.5 vs 22.6,
 * 56x56x64 7.0 vs 13.1, 28x28x128 7.4 vs 12.1 (oneDNN's fp32 GEMM is slow at these widths).
 *
 * Packed weight (the Python side packs it): fp32 (K, C, Op), bf16 (K, ceil(C / 2), Op, 2) pairs
 * of input channels (the odd channel's partner zero), Op = C_out rounded up to 32 (zeros).
 * `zero_row` holds at least C zeros of x's dtype: the row an absent tap reads.
 * Returns 0 when this build has no such path (no AVX-512, or no AVX512-BF16 for bf16): the
 * caller then gathers and calls the GEMM. */
#define FUSED_ROWS 6

typedef struct {
  const void *x, *w, *zero_row;
  const int32_t *nbr;
  void *y;
  int dt;
  long M, K, C, O, Op;
} fused_args;

#ifdef HAVE_AVX512
static inline __mmask16 lanes16(long n) { return n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1u); }

static void fused_f32_task(void *ctx, int t, int n) {
  const fused_args *a = ctx;
  const long blocks = (a->M + FUSED_ROWS - 1) / FUSED_ROWS;
  const float *w = a->w;
  for (long b = split_start(blocks, t, n); b < split_start(blocks, t + 1, n); ++b) {
    const long m0 = b * FUSED_ROWS;
    const int rows = a->M - m0 < FUSED_ROWS ? (int)(a->M - m0) : FUSED_ROWS;
    for (long o0 = 0; o0 < a->Op; o0 += 32) {
      __m512 acc[FUSED_ROWS][2];
      for (int r = 0; r < FUSED_ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (long k = 0; k < a->K; ++k) {
        const float *src[FUSED_ROWS];
        for (int r = 0; r < FUSED_ROWS; ++r) {
          const int32_t s = r < rows ? a->nbr[(m0 + r) * a->K + k] : -1;
          src[r] = s >= 0 ? (const float *)a->x + (long)s * a->C : (const float *)a->zero_row;
        }
        const float *wk = w + k * a->C * a->Op + o0;
        for (long i = 0; i < a->C; ++i) {
          const __m512 w0 = _mm512_loadu_ps(wk + i * a->Op), w1 = _mm512_loadu_ps(wk + i * a->Op + 16);
          for (int r = 0; r < FUSED_ROWS; ++r) {
            const __m512 xv = _mm512_set1_ps(src[r][i]);
            acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
          }
        }
      }
      for (int r = 0; r < rows; ++r) {
        float *yr = (float *)a->y + (m0 + r) * a->O + o0;
        _mm512_mask_storeu_ps(yr, lanes16(a->O - o0), acc[r][0]);
        _mm512_mask_storeu_ps(yr + 16, lanes16(a->O - o0 - 16), acc[r][1]);
      }
    }
  }
}

#ifdef __AVX512BF16__
static void fused_bf16_task(void *ctx, int t, int n) {
  const fused_args *a = ctx;
  const long blocks = (a->M + FUSED_ROWS - 1) / FUSED_ROWS;
  const long pairs = a->C / 2, packed = (a->C + 1) / 2; /* full pairs; pairs in the packed weight */
  const uint16_t *w = a->w;
  for (long b = split_start(blocks, t, n); b < split_start(blocks, t + 1, n); ++b) {
    const long m0 = b * FUSED_ROWS;
    const int rows = a->M - m0 < FUSED_ROWS ? (int)(a->M - m0) : FUSED_ROWS;
    for (long o0 = 0; o0 < a->Op; o0 += 32) {
      __m512 acc[FUSED_ROWS][2];
      for (int r = 0; r < FUSED_ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (long k = 0; k < a->K; ++k) {
        const uint16_t *src[FUSED_ROWS];
        for (int r = 0; r < FUSED_ROWS; ++r) {
          const int32_t s = r < rows ? a->nbr[(m0 + r) * a->K + k] : -1;
          src[r] = s >= 0 ? (const uint16_t *)a->x + (long)s * a->C : (const uint16_t *)a->zero_row;
        }
        const uint16_t *wk = w + (k * packed * a->Op + o0) * 2;
        for (long q = 0; q < packed; ++q) {
          const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk + q * a->Op * 2);
          const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wk + q * a->Op * 2 + 32);
          for (int r = 0; r < FUSED_ROWS; ++r) {
            uint32_t pair; /* channels 2q, 2q + 1; an odd C's last channel alone (never read past the row) */
            if (q < pairs) memcpy(&pair, src[r] + 2 * q, sizeof pair);
            else pair = src[r][2 * q];
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, w1);
          }
        }
      }
      for (int r = 0; r < rows; ++r) {
        uint16_t *yr = (uint16_t *)a->y + (m0 + r) * a->O + o0;
        _mm256_mask_storeu_epi16(yr, lanes16(a->O - o0), (__m256i)_mm512_cvtneps_pbh(acc[r][0]));
        _mm256_mask_storeu_epi16(yr + 16, lanes16(a->O - o0 - 16), (__m256i)_mm512_cvtneps_pbh(acc[r][1]));
      }
    }
  }
}
#endif
#endif

int rows_gather_conv_fused(const void *x, int dt, const int32_t *nbr, const void *w, const void *zero_row, void *y,
                           long M, long K, long C, long O, int threads) {
  fused_args a = {.x = x, .w = w, .zero_row = zero_row, .nbr = nbr, .y = y, .dt = dt, .M = M, .K = K, .C = C,
                  .O = O, .Op = (O + 31) / 32 * 32};
  task_fn task = NULL;
#ifdef HAVE_AVX512
  if (dt == DT_F32) task = fused_f32_task;
#ifdef __AVX512BF16__
  if (dt == DT_BF16) task = fused_bf16_task;
#endif
#endif
  if (!task) return 0;
  pool_run(task, &a, threads_for((M + FUSED_ROWS - 1) / FUSED_ROWS, threads, MIN_BLOCKS_PER_THREAD));
  return 1;
}
