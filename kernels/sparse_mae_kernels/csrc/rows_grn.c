/* GRN per sample on packed rows (M, C), with an optional bias + GELU prologue: the C
 * kernels of ops/rows_grn.py (plain-torch reference: rows_grn_reference).
 *
 * Rows of sample n are [offsets[n], offsets[n+1]). With the prologue, the GRN input is
 * v = gelu(h + bias) (each step rounded to h's dtype, as the separate ops would store it),
 * else v = h. The per-sample maths on (N, C) is done by the caller in torch; here are the
 * four passes over the rows:
 *   stats           sq[n, c] = sum over the rows of n of v^2; v is stored (with a prologue)
 *   apply           out = v * scale[n] + beta               (scale = 1 + gamma * nx)
 *   backward sums   dyx[n, c] = sum gu * v,  dy[c] = sum gu (the gradients of gamma, beta)
 *   backward input  gv = gu * scale[n] + v * coef[n];  gh = gv * gelu'(h + bias) with the
 *                   prologue (and the bias gradient sum_m gh), else gh = gv
 * The GELU is the costly part (an erf per element): the forward evaluates it once and
 * stores v for apply and the backward sums; the backward input evaluates it once more, for
 * its derivative. Sums are per thread (slabs), summed by the caller.
 */
#include <stdlib.h>

#include "common.h"

#define MIN_ROWS_PER_THREAD 32

typedef struct {
  const void *h; /* the op's input (stats, backward input) or v (apply, backward sums) */
  int hdt;
  const float *bias;
  int gelu;
  const int64_t *offsets;
  long N;
  const float *scale, *beta, *coef;
  void *out; /* v (stats), the GRN output (apply), the input gradient (backward input) */
  int odt;
  const void *gu;
  int gudt;
  float *partial_rows, *partial_cols; /* (threads, N, C), (threads, C) */
  long M, C;
} grn_args;

static inline void accumulate(float *acc, long c0, int n, vf v) {
  vstore(acc, DT_F32, c0, n, vload(acc, DT_F32, c0, n) + v);
}

/* rows of thread t, and the segment of its first row */
#define THREAD_ROWS(a, t, n)                                                   \
  const long m0 = split_start((a)->M, t, n), m1 = split_start((a)->M, t + 1, n); \
  long seg = (a)->M ? segment_of((a)->offsets, (a)->N, m0) : 0;

#define NEXT_SEGMENT(a, m) \
  while (seg + 1 < (a)->N && (a)->offsets[seg + 1] <= (m)) ++seg;

static void stats_task(void *ctx, int t, int n) {
  const grn_args *a = ctx;
  const long C = a->C;
  const int prologue = a->bias || a->gelu;
  float *sq = a->partial_rows + (long)t * a->N * C;
  memset(sq, 0, sizeof(float) * a->N * C);
  THREAD_ROWS(a, t, n)
  for (long m = m0; m < m1; ++m) {
    NEXT_SEGMENT(a, m)
    float *row = sq + seg * C;
    for (long c0 = 0; c0 < C; c0 += VL) {
      const int nc = chunk(C, c0);
      vf v = vload(a->h, a->hdt, m * C + c0, nc);
      if (prologue) {
        if (a->bias) v = vround(a->hdt, v + vload(a->bias, DT_F32, c0, nc));
        if (a->gelu) v = vround(a->hdt, v * vgelu_cdf(v));
        vstore(a->out, a->odt, m * C + c0, nc, v);
      }
      accumulate(row, c0, nc, v * v);
    }
  }
}

static void apply_task(void *ctx, int t, int n) {
  const grn_args *a = ctx;
  const long C = a->C;
  THREAD_ROWS(a, t, n)
  for (long m = m0; m < m1; ++m) {
    NEXT_SEGMENT(a, m)
    const float *s = a->scale + seg * C;
    for (long c0 = 0; c0 < C; c0 += VL) {
      const int nc = chunk(C, c0);
      vf v = vload(a->h, a->hdt, m * C + c0, nc);
      vstore(a->out, a->odt, m * C + c0, nc, v * vload(s, DT_F32, c0, nc) + vload(a->beta, DT_F32, c0, nc));
    }
  }
}

static void backward_sums_task(void *ctx, int t, int n) {
  const grn_args *a = ctx;
  const long C = a->C;
  float *dyx = a->partial_rows + (long)t * a->N * C, *dy = a->partial_cols + (long)t * C;
  memset(dyx, 0, sizeof(float) * a->N * C);
  memset(dy, 0, sizeof(float) * C);
  THREAD_ROWS(a, t, n)
  for (long m = m0; m < m1; ++m) {
    NEXT_SEGMENT(a, m)
    float *row = dyx + seg * C;
    for (long c0 = 0; c0 < C; c0 += VL) {
      const int nc = chunk(C, c0);
      vf v = vload(a->h, a->hdt, m * C + c0, nc);
      vf g = vload(a->gu, a->gudt, m * C + c0, nc);
      accumulate(row, c0, nc, g * v);
      accumulate(dy, c0, nc, g);
    }
  }
}

static void backward_input_task(void *ctx, int t, int n) {
  const grn_args *a = ctx;
  const long C = a->C;
  float *gb = a->partial_cols ? a->partial_cols + (long)t * C : NULL;
  if (gb) memset(gb, 0, sizeof(float) * C);
  THREAD_ROWS(a, t, n)
  for (long m = m0; m < m1; ++m) {
    NEXT_SEGMENT(a, m)
    const float *s = a->scale + seg * C, *q = a->coef + seg * C;
    for (long c0 = 0; c0 < C; c0 += VL) {
      const int nc = chunk(C, c0);
      vf pre = vload(a->h, a->hdt, m * C + c0, nc);
      if (a->bias) pre = vround(a->hdt, pre + vload(a->bias, DT_F32, c0, nc));
      vf cdf = vsplat(0.0f), v = pre;
      if (a->gelu) {
        cdf = vgelu_cdf(pre);
        v = vround(a->hdt, pre * cdf);
      }
      vf gv = vload(a->gu, a->gudt, m * C + c0, nc) * vload(s, DT_F32, c0, nc) + v * vload(q, DT_F32, c0, nc);
      if (a->gelu) gv = vround(a->hdt, gv) * vgelu_grad(pre, cdf); /* the GELU backward reads a stored gradient */
      vstore(a->out, a->odt, m * C + c0, nc, gv);
      if (gb) accumulate(gb, c0, nc, vround(a->odt, gv));
    }
  }
}

static int run(task_fn fn, grn_args *a, int threads) {
  return pool_run(fn, a, threads_for(a->M, threads, MIN_ROWS_PER_THREAD));
}

/* partial_sq (threads, N, C); v (M, C) written when there is a prologue (bias or gelu).
 * Returns the slabs written. */
int rows_grn_stats(const void *h, int hdt, const float *bias, int gelu, void *v, int vdt, const int64_t *offsets,
                   long N, float *partial_sq, long M, long C, int threads) {
  grn_args a = {.h = h, .hdt = hdt, .bias = bias, .gelu = gelu, .out = v, .odt = vdt, .offsets = offsets, .N = N,
                .partial_rows = partial_sq, .M = M, .C = C};
  return run(stats_task, &a, threads);
}

void rows_grn_apply(const void *v, int vdt, const int64_t *offsets, long N, const float *scale, const float *beta,
                    void *out, int odt, long M, long C, int threads) {
  grn_args a = {.h = v, .hdt = vdt, .offsets = offsets, .N = N, .scale = scale, .beta = beta, .out = out,
                .odt = odt, .M = M, .C = C};
  run(apply_task, &a, threads);
}

/* partial_dyx (threads, N, C), partial_dy (threads, C); returns the slabs written */
int rows_grn_backward_sums(const void *v, int vdt, const void *gu, int gudt, const int64_t *offsets, long N,
                           float *partial_dyx, float *partial_dy, long M, long C, int threads) {
  grn_args a = {.h = v, .hdt = vdt, .gu = gu, .gudt = gudt, .offsets = offsets, .N = N,
                .partial_rows = partial_dyx, .partial_cols = partial_dy, .M = M, .C = C};
  return run(backward_sums_task, &a, threads);
}

/* gh (M, C) in dtype ghdt; partial_gbias (threads, C) or NULL; returns the slabs written */
int rows_grn_backward_input(const void *h, int hdt, const float *bias, int gelu, const void *gu, int gudt,
                            const int64_t *offsets, long N, const float *scale, const float *coef, void *gh, int ghdt,
                            float *partial_gbias, long M, long C, int threads) {
  grn_args a = {.h = h, .hdt = hdt, .bias = bias, .gelu = gelu, .gu = gu, .gudt = gudt, .offsets = offsets,
                .N = N, .scale = scale, .coef = coef, .out = gh, .odt = ghdt, .partial_cols = partial_gbias,
                .M = M, .C = C};
  return run(backward_input_task, &a, threads);
}
