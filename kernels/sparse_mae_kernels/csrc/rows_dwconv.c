/* Submanifold depthwise 7x7 on packed rows (M, C): the C kernels of ops/rows_dwconv.py and
 * the forward of ops/rows_dwconv_layernorm.py. Plain-torch reference: rows_dwconv_reference.
 *
 *   nbr (M, 49) int32: row of site m's neighbour at tap k = (dy+3)*7 + (dx+3), -1 if absent
 *   forward      y[m, c] = bias[c] + sum_k w[k, c] * x[nbr[m, k], c]      (w tap-major, fp32)
 *   input grad   the forward with the taps flipped (k -> 48 - k; the caller flips w)
 *   weight grad  gw[k, c] = sum_m g[m, c] * x[nbr[m, k], c];  bias grad gb[c] = sum_m g[m, c]
 *
 * LayerNorm epilogue (ln_w given): the row is finished in registers / L1, rounded to y's
 * dtype and stored, then normalised from the stored values (what a separate LayerNorm on
 * y would read): z = (y - mean) * rstd * ln_w + ln_b, mean and rstd kept for the backward.
 *
 * Why C: torch has no gather-multiply-accumulate; a torch version materialises a halo per
 * tile (49x the data on the 1x1 tiles of the last stage). Here every neighbour row is read
 * in place, 64 channels at a time accumulated in four vector registers. Rows are split
 * evenly over the threads (deterministic for a thread count).
 */
#include <stdlib.h>

#include "common.h"

#define MIN_ROWS_PER_THREAD 64 /* below this a thread costs more than it saves */
#define WGRAD_ROW_BLOCK 32     /* rows whose products are summed in registers per tap */
#define MAX_NV 8               /* vectors per channel block: up to 128 channels in registers */

typedef struct {
  const void *x;
  int xdt;
  long xsize;         /* bytes per element of x */
  const float *zeros; /* MAX_NV * VL zeros: the row an absent neighbour reads */
  const int32_t *nbr;
  const float *w, *bias;
  void *y;
  int ydt;
  const float *ln_w, *ln_b;
  float eps;
  void *z;
  int zdt;
  float *mean, *rstd;
  /* weight grad */
  const void *g;
  int gdt;
  float *partial_w, *partial_b;
  long M, C;
} dwconv_args;

/* Channel blocks: C is covered by blocks of up to MAX_NV vectors, the last vector of the
 * last block partial (masked). One pass over the 49 taps per block keeps the block's
 * accumulators in registers; small C (96 at the first stage of tiny) is one block. The
 * block kernels are generated for each NV so that their loops unroll into registers. */
#define FOR_V(NV) for (int v = 0; v < (NV); ++v)
#define LANES(NV, v, last) ((v) == (NV) - 1 ? (last) : VL)

/* The taps one output row sums, as (tap, source row) pairs. Absent neighbours are common at
 * patch borders, and a branch per tap would mispredict there. Where most taps are present
 * (the large tiles of the first stages) all 49 are summed, absent ones reading a zero row:
 * a fixed trip count; elsewhere (small tiles, mostly absent) only the present taps, compacted
 * without a branch. */
#define DENSE_ROW_MIN_TAPS 40

typedef struct {
  int count;
  int32_t tap[TAPS];
  int32_t src[TAPS]; /* -1: the zero row */
} taps_t;

static inline void row_taps(const int32_t *nb, taps_t *p) {
  int present = 0;
  for (int k = 0; k < TAPS; ++k) {
    p->tap[present] = k;
    p->src[present] = nb[k];
    present += nb[k] >= 0;
  }
  if (present >= DENSE_ROW_MIN_TAPS) {
    for (int k = 0; k < TAPS; ++k) {
      p->tap[k] = k;
      p->src[k] = nb[k];
    }
    present = TAPS;
  }
  p->count = present;
}

/* y[c0 .. c0 + NV*VL) of row m = bias + sum over the present taps of w[k] * x[nbr[k]] */
#define CONV_BLOCK(NV)                                                                        \
  static void conv_block_##NV(const dwconv_args *a, const taps_t *p, long m, long c0, int last, \
                              float *buf) {                                                   \
    const long C = a->C;                                                                      \
    vf acc[NV];                                                                               \
    FOR_V(NV) acc[v] = a->bias ? vload(a->bias, DT_F32, c0 + v * VL, LANES(NV, v, last)) : vsplat(0.0f); \
    for (int j = 0; j < p->count; ++j) {                                                      \
      const int32_t src = p->src[j];                                                          \
      const void *xr = src >= 0 ? (const char *)a->x + ((long)src * C + c0) * a->xsize       \
                                : (const void *)a->zeros;                                    \
      const float *wk = a->w + (long)p->tap[j] * C + c0;                                      \
      FOR_V(NV) acc[v] += vload(xr, a->xdt, v * VL, LANES(NV, v, last)) *                     \
                          vload(wk, DT_F32, v * VL, LANES(NV, v, last));                      \
    }                                                                                         \
    FOR_V(NV) {                                                                               \
      vstore(a->y, a->ydt, m * C + c0 + v * VL, LANES(NV, v, last), acc[v]);                  \
      if (buf) vstore(buf, DT_F32, c0 + v * VL, LANES(NV, v, last), vround(a->ydt, acc[v]));  \
    }                                                                                         \
  }

/* gw[k, c0 .. c0 + NV*VL) += sum over rows [b0, b1) of x[nbr[m, k]] * g[m] (g in gbuf, fp32,
 * row r of the block at gbuf + r * C) */
#define WGRAD_BLOCK(NV)                                                                       \
  static void wgrad_block_##NV(const dwconv_args *a, long b0, long b1, long c0, int last,      \
                               const float *gbuf, float *gw) {                                \
    const long C = a->C;                                                                      \
    for (int k = 0; k < TAPS; ++k) {                                                          \
      vf acc[NV];                                                                             \
      FOR_V(NV) acc[v] = vsplat(0.0f);                                                        \
      for (long m = b0; m < b1; ++m) {                                                        \
        const int32_t src = a->nbr[m * TAPS + k];                                             \
        if (src < 0) continue;                                                                \
        const long xo = (long)src * C + c0;                                                   \
        const float *gr = gbuf + (m - b0) * C + c0;                                           \
        FOR_V(NV) acc[v] += vload(a->x, a->xdt, xo + v * VL, LANES(NV, v, last)) *           \
                            vload(gr, DT_F32, v * VL, LANES(NV, v, last));                    \
      }                                                                                       \
      float *g_k = gw + (long)k * C + c0;                                                     \
      FOR_V(NV) vstore(g_k, DT_F32, v * VL, LANES(NV, v, last),                               \
                       vload(g_k, DT_F32, v * VL, LANES(NV, v, last)) + acc[v]);              \
    }                                                                                         \
  }

CONV_BLOCK(1) CONV_BLOCK(2) CONV_BLOCK(3) CONV_BLOCK(4) CONV_BLOCK(5) CONV_BLOCK(6) CONV_BLOCK(7) CONV_BLOCK(8)
WGRAD_BLOCK(1) WGRAD_BLOCK(2) WGRAD_BLOCK(3) WGRAD_BLOCK(4) WGRAD_BLOCK(5) WGRAD_BLOCK(6) WGRAD_BLOCK(7)
WGRAD_BLOCK(8)

typedef void (*conv_block_fn)(const dwconv_args *, const taps_t *, long, long, int, float *);
typedef void (*wgrad_block_fn)(const dwconv_args *, long, long, long, int, const float *, float *);
static const conv_block_fn conv_blocks[MAX_NV + 1] = {NULL, conv_block_1, conv_block_2, conv_block_3, conv_block_4,
                                                      conv_block_5, conv_block_6, conv_block_7, conv_block_8};
static const wgrad_block_fn wgrad_blocks[MAX_NV + 1] = {NULL, wgrad_block_1, wgrad_block_2, wgrad_block_3,
                                                        wgrad_block_4, wgrad_block_5, wgrad_block_6, wgrad_block_7,
                                                        wgrad_block_8};

/* the next channel block at c0: its vector count and the lanes of its last vector */
static inline int block_at(long C, long c0, int *last) {
  const long rest = C - c0;
  const long vectors = (rest + VL - 1) / VL;
  const int nv = vectors > MAX_NV ? MAX_NV : (int)vectors;
  const long covered = (long)(nv - 1) * VL;
  *last = rest - covered >= VL ? VL : (int)(rest - covered);
  return nv;
}

static void forward_task(void *ctx, int t, int n) {
  const dwconv_args *a = ctx;
  const long C = a->C, m0 = split_start(a->M, t, n), m1 = split_start(a->M, t + 1, n);
  float *buf = a->ln_w ? malloc(sizeof(float) * (C + VL)) : NULL;
  taps_t taps;
  for (long m = m0; m < m1; ++m) {
    row_taps(a->nbr + m * TAPS, &taps);
    for (long c0 = 0; c0 < C; c0 += MAX_NV * VL) {
      int last;
      const int nv = block_at(C, c0, &last);
      conv_blocks[nv](a, &taps, m, c0, last, buf);
    }
    if (buf) layernorm_row_forward(buf, C, a->ln_w, a->ln_b, a->eps, a->z, a->zdt, m * C, a->mean + m, a->rstd + m);
  }
  free(buf);
}

static void weight_grad_task(void *ctx, int t, int n) {
  const dwconv_args *a = ctx;
  const long C = a->C, m0 = split_start(a->M, t, n), m1 = split_start(a->M, t + 1, n);
  float *gw = a->partial_w + (long)t * TAPS * C;
  float *gb = a->partial_b ? a->partial_b + (long)t * C : NULL;
  memset(gw, 0, sizeof(float) * TAPS * C);
  if (gb) memset(gb, 0, sizeof(float) * C);
  /* the block's gradient rows in fp32, converted once instead of once per tap */
  float *gbuf = malloc(sizeof(float) * (WGRAD_ROW_BLOCK * C + VL));
  for (long b0 = m0; b0 < m1; b0 += WGRAD_ROW_BLOCK) {
    const long b1 = b0 + WGRAD_ROW_BLOCK < m1 ? b0 + WGRAD_ROW_BLOCK : m1;
    for (long m = b0; m < b1; ++m)
      for (long c0 = 0; c0 < C; c0 += VL) {
        const int nc = chunk(C, c0);
        vf g = vload(a->g, a->gdt, m * C + c0, nc);
        vstore(gbuf, DT_F32, (m - b0) * C + c0, nc, g);
        if (gb) vstore(gb, DT_F32, c0, nc, vload(gb, DT_F32, c0, nc) + g);
      }
    for (long c0 = 0; c0 < C; c0 += MAX_NV * VL) {
      int last;
      const int nv = block_at(C, c0, &last);
      wgrad_blocks[nv](a, b0, b1, c0, last, gbuf, gw);
    }
  }
  free(gbuf);
}

/* y = bias + gather(x) (bias may be NULL); with ln_w, also the LayerNorm epilogue */
void rows_dwconv_forward(const void *x, int xdt, const int32_t *nbr, const float *w, const float *bias,
                         void *y, int ydt, const float *ln_w, const float *ln_b,
                         float eps, void *z, int zdt, float *mean, float *rstd, long M, long C, int threads) {
  static const float zeros[MAX_NV * VL];
  dwconv_args a = {.x = x, .xdt = xdt, .xsize = xdt == DT_F32 ? 4 : 2, .zeros = zeros, .nbr = nbr, .w = w,
                   .bias = bias, .y = y,
                   .ydt = ydt, .ln_w = ln_w, .ln_b = ln_b, .eps = eps, .z = z, .zdt = zdt, .mean = mean,
                   .rstd = rstd, .M = M, .C = C};
  pool_run(forward_task, &a, threads_for(M, threads, MIN_ROWS_PER_THREAD));
}

/* partial_w (threads, 49, C), partial_b (threads, C) or NULL: thread t writes slab t.
 * Returns the number of slabs written. */
int rows_dwconv_weight_grad(const void *x, int xdt, const int32_t *nbr, const void *g, int gdt, float *partial_w,
                            float *partial_b, long M, long C, int threads) {
  dwconv_args a = {.x = x, .xdt = xdt, .nbr = nbr, .g = g, .gdt = gdt, .partial_w = partial_w,
                   .partial_b = partial_b, .M = M, .C = C};
  return pool_run(weight_grad_task, &a, threads_for(M, threads, MIN_ROWS_PER_THREAD));
}
