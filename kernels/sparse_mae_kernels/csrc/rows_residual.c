/* Residual epilogue on packed rows (M, C): the C kernels of ops/rows_residual.py (plain-torch
 * reference: rows_residual_reference). It ends a ConvNeXt block after its last matmul:
 *
 *   forward   out = x + r,  r = (y + bias) * scale[n]      (scale: the per-sample drop-path
 *             factor, or none; r rounded to y's dtype at each step, as separate ops store it)
 *   backward  gx = g (the caller passes g on, no copy); gy = g * scale[n] in y's dtype
 *             (written when scaled; else gy is g in y's dtype, made by the caller);
 *             grad bias = sum_m gy (of the stored, rounded values, as a Linear's backward sees)
 */
#include "common.h"

#define MIN_ROWS_PER_THREAD 64

typedef struct {
  const void *x, *y, *g;
  int xdt, ydt, gdt;
  const float *bias, *scale;
  const int64_t *offsets;
  long N;
  void *out;
  int odt;
  float *partial_b;
  long M, C;
} residual_args;

#define THREAD_ROWS(a, t, n)                                                   \
  const long m0 = split_start((a)->M, t, n), m1 = split_start((a)->M, t + 1, n); \
  long seg = (a)->M && (a)->scale ? segment_of((a)->offsets, (a)->N, m0) : 0;

#define NEXT_SEGMENT(a, m) \
  if ((a)->scale)          \
    while (seg + 1 < (a)->N && (a)->offsets[seg + 1] <= (m)) ++seg;

static void forward_task(void *ctx, int t, int n) {
  const residual_args *a = ctx;
  const long C = a->C;
  THREAD_ROWS(a, t, n)
  for (long m = m0; m < m1; ++m) {
    NEXT_SEGMENT(a, m)
    for (long c0 = 0; c0 < C; c0 += VL) {
      const int nc = chunk(C, c0);
      vf r = vload(a->y, a->ydt, m * C + c0, nc);
      if (a->bias) r = vround(a->ydt, r + vload(a->bias, DT_F32, c0, nc));
      if (a->scale) r = vround(a->ydt, r * a->scale[seg]);
      vstore(a->out, a->odt, m * C + c0, nc, vload(a->x, a->xdt, m * C + c0, nc) + r);
    }
  }
}

static void backward_task(void *ctx, int t, int n) {
  const residual_args *a = ctx;
  const long C = a->C;
  float *gb = a->partial_b ? a->partial_b + (long)t * C : NULL;
  if (gb) memset(gb, 0, sizeof(float) * C);
  THREAD_ROWS(a, t, n)
  for (long m = m0; m < m1; ++m) {
    NEXT_SEGMENT(a, m)
    for (long c0 = 0; c0 < C; c0 += VL) {
      const int nc = chunk(C, c0);
      vf g = vload(a->g, a->gdt, m * C + c0, nc);
      if (a->scale) {
        g = g * a->scale[seg];
        vstore(a->out, a->odt, m * C + c0, nc, g);
      }
      if (gb) vstore(gb, DT_F32, c0, nc, vload(gb, DT_F32, c0, nc) + vround(a->odt, g));
    }
  }
}

void rows_residual_forward(const void *x, int xdt, const void *y, int ydt, const float *bias, const float *scale,
                           const int64_t *offsets, long N, void *out, int odt, long M, long C, int threads) {
  residual_args a = {.x = x, .xdt = xdt, .y = y, .ydt = ydt, .bias = bias, .scale = scale, .offsets = offsets,
                     .N = N, .out = out, .odt = odt, .M = M, .C = C};
  pool_run(forward_task, &a, threads_for(M, threads, MIN_ROWS_PER_THREAD));
}

/* gy (M, C) of dtype gydt written only when scale is given; partial_b (threads, C) or NULL.
 * Returns slabs. */
int rows_residual_backward(const void *g, int gdt, const float *scale, const int64_t *offsets, long N, void *gy,
                           int gydt, float *partial_b, long M, long C, int threads) {
  residual_args a = {.g = g, .gdt = gdt, .scale = scale, .offsets = offsets, .N = N, .out = gy, .odt = gydt,
                     .partial_b = partial_b, .M = M, .C = C};
  return pool_run(backward_task, &a, threads_for(M, threads, MIN_ROWS_PER_THREAD));
}
