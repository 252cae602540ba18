/* LayerNorm over the channels of packed rows (M, C): the C kernels of ops/rows_layernorm.py
 * (plain-torch reference: rows_layernorm_reference). bf16 or fp32 in and out, fp32 inside.
 *
 *   forward   z[out_row(m)] = (x[m] - mean[m]) * rstd[m] * w + b      (out_row: identity or a
 *             row map, so a following reshape, e.g. into 2x2 windows, costs no copy)
 *   backward  with xh = (x - mean) * rstd and gw = gz * w:
 *             gx = rstd * (gw - mean_c(gw) - xh * mean_c(gw * xh)),
 *             grad w = sum_m gz * xh, grad b = sum_m gz
 * Each row is processed whole in L1; mean and variance in two passes as torch does.
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#define MIN_ROWS_PER_THREAD 64

void layernorm_row_forward(const float *row, long C, const float *w, const float *b, float eps, void *z, int zdt,
                           long zoff, float *mean_out, float *rstd_out) {
  vf s = vsplat(0.0f);
  for (long c0 = 0; c0 < C; c0 += VL) s += vload(row, DT_F32, c0, chunk(C, c0));
  const float mean = vsum(s) / (float)C;
  vf q = vsplat(0.0f);
  for (long c0 = 0; c0 < C; c0 += VL) {
    const int n = chunk(C, c0);
    vf d = vselect(lanes_below(n), vload(row, DT_F32, c0, n) - mean, vsplat(0.0f));
    q += d * d;
  }
  const float rstd = 1.0f / sqrtf(vsum(q) / (float)C + eps);
  *mean_out = mean;
  *rstd_out = rstd;
  for (long c0 = 0; c0 < C; c0 += VL) {
    const int n = chunk(C, c0);
    vf zn = (vload(row, DT_F32, c0, n) - mean) * rstd * vload(w, DT_F32, c0, n) + vload(b, DT_F32, c0, n);
    vstore(z, zdt, zoff + c0, n, zn);
  }
}

typedef struct {
  const void *x;
  int xdt;
  const float *w, *b;
  float eps;
  void *z;
  int zdt;
  const int64_t *out_rows;
  float *mean, *rstd;
  const void *gz;
  int gzdt;
  void *gx;
  int gxdt;
  float *partial_w, *partial_b;
  long M, C;
} layernorm_args;

static void forward_task(void *ctx, int t, int n) {
  const layernorm_args *a = ctx;
  const long C = a->C, m0 = split_start(a->M, t, n), m1 = split_start(a->M, t + 1, n);
  float *row = malloc(sizeof(float) * (C + VL));
  for (long m = m0; m < m1; ++m) {
    for (long c0 = 0; c0 < C; c0 += VL) {
      const int nc = chunk(C, c0);
      vf v = vload(a->x, a->xdt, m * C + c0, nc);
      memcpy(row + c0, &v, sizeof(float) * nc);
    }
    const long dest = a->out_rows ? a->out_rows[m] : m;
    layernorm_row_forward(row, C, a->w, a->b, a->eps, a->z, a->zdt, dest * C, a->mean + m, a->rstd + m);
  }
  free(row);
}

static inline void accumulate(float *acc, long c0, int n, vf v) {
  vstore(acc, DT_F32, c0, n, vload(acc, DT_F32, c0, n) + v);
}

static void backward_task(void *ctx, int t, int n) {
  const layernorm_args *a = ctx;
  const long C = a->C, m0 = split_start(a->M, t, n), m1 = split_start(a->M, t + 1, n);
  float *pw = a->partial_w + (long)t * C, *pb = a->partial_b + (long)t * C;
  memset(pw, 0, sizeof(float) * C);
  memset(pb, 0, sizeof(float) * C);
  for (long m = m0; m < m1; ++m) {
    const float mean = a->mean[m], rstd = a->rstd[m];
    const long src = (a->out_rows ? a->out_rows[m] : m) * C;
    vf s1 = vsplat(0.0f), s2 = vsplat(0.0f);
    for (long c0 = 0; c0 < C; c0 += VL) {
      const int nc = chunk(C, c0);
      vf xh = (vload(a->x, a->xdt, m * C + c0, nc) - mean) * rstd;
      vf g = vload(a->gz, a->gzdt, src + c0, nc); /* zero in padding lanes */
      vf gw = g * vload(a->w, DT_F32, c0, nc);
      s1 += gw;
      s2 += gw * xh;
      accumulate(pw, c0, nc, g * xh);
      accumulate(pb, c0, nc, g);
    }
    const float c1 = vsum(s1) / (float)C, c2 = vsum(s2) / (float)C;
    for (long c0 = 0; c0 < C; c0 += VL) {
      const int nc = chunk(C, c0);
      vf xh = (vload(a->x, a->xdt, m * C + c0, nc) - mean) * rstd;
      vf gw = vload(a->gz, a->gzdt, src + c0, nc) * vload(a->w, DT_F32, c0, nc);
      vf gx = rstd * (gw - c1 - xh * c2);
      vstore(a->gx, a->gxdt, m * C + c0, nc, gx);
    }
  }
}

void rows_layernorm_forward(const void *x, int xdt, const float *w, const float *b, float eps, void *z, int zdt,
                            const int64_t *out_rows, float *mean, float *rstd, long M, long C, int threads) {
  layernorm_args a = {.x = x, .xdt = xdt, .w = w, .b = b, .eps = eps, .z = z, .zdt = zdt, .out_rows = out_rows,
                      .mean = mean, .rstd = rstd, .M = M, .C = C};
  pool_run(forward_task, &a, threads_for(M, threads, MIN_ROWS_PER_THREAD));
}

/* partial_w, partial_b: (threads, C), slab t from thread t.
 * Returns the number of slabs written. */
int rows_layernorm_backward(const void *x, int xdt, const float *w, const float *mean, const float *rstd,
                            const void *gz, int gzdt, const int64_t *out_rows, void *gx, int gxdt, float *partial_w,
                            float *partial_b, long M, long C, int threads) {
  layernorm_args a = {.x = x, .xdt = xdt, .w = w, .mean = (float *)mean, .rstd = (float *)rstd, .gz = gz,
                      .gzdt = gzdt, .out_rows = out_rows, .gx = gx, .gxdt = gxdt, .partial_w = partial_w,
                      .partial_b = partial_b, .M = M, .C = C};
  return pool_run(backward_task, &a, threads_for(M, threads, MIN_ROWS_PER_THREAD));
}
