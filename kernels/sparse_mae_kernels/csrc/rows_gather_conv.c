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
 * Why only the gather in C: the GEMM is 86-99% of gather + GEMM at ResNet-50's 3x3 and
 * strided 1x1 shapes (benchmarks/gather_conv.py --split), so fusing the gather into a GEMM
 * of our own could win at most the rest, against oneDNN's (AVX-512, bf16 dot products).
 * The gather is a copy, so any element type goes through unchanged (bf16 stays bf16: no
 * conversion pass): each (row, tap) is one contiguous copy of C elements, which the C
 * library does with the widest vector moves of the CPU. Rows are split evenly over the
 * pool's threads. */
#include <string.h>

#include "common.h"

#define MIN_ROWS_PER_THREAD 256 /* a (row, tap) copy is ~C bytes; below this a thread costs more than it saves */

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

