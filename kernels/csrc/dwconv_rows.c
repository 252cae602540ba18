/* Submanifold depthwise 7x7 on packed rows (M, C), CPU, float32: the C kernels behind
 * sparse_mae_kernels.cpu_ops. Same contract as the plain-torch reference
 * (sparse_mae_kernels.dwconv_rows.sparse_dwconv_reference):
 *
 *   nbr (M, 49) int32: row of site m's neighbour at tap k = (dy+3)*7 + (dx+3), -1 if absent
 *   forward      out[m, c] = bias[c] + sum_k w[k, c] * x[nbr[m, k], c]      (w tap-major)
 *   weight grad  gw[k, c]  = sum_m grad[m, c] * x[nbr[m, k], c]
 *   input grad   the forward with the taps flipped (k -> 48 - k): the map is symmetric
 *
 * Why C: torch has no gather-multiply-accumulate, so a torch version materialises a
 * (s+6)^2-site halo per tile (49x the data on the 1x1 tiles of the last stage) and
 * reduces the depthwise weight gradient in 49 passes over memory. Here every neighbour
 * row is read in place and each output or weight-gradient chunk is accumulated in
 * registers. Channels are processed in chunks of 32, then 8, then 1 (the compiler
 * vectorises the fixed-size chunks). Rows are split evenly over `threads` pthreads; the
 * split depends only on M and `threads`, so results are deterministic for a thread count.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define TAPS 49
#define MAX_THREADS 256
#define MIN_ROWS_PER_THREAD 64 /* below this a thread costs more than it saves */
#define WGRAD_ROW_BLOCK 32     /* rows whose products are summed in registers per tap */

typedef struct {
  const float *x, *w, *bias, *grad;
  const int32_t *nbr;
  float *out;
  long m0, m1, channels;
} job_t;

/* one chunk [c0, c0 + CB) of out[m] = bias + sum_k w[k] * x[nbr[m, k]] */
#define FORWARD_CHUNK(CB)                                                     \
  for (; c0 + (CB) <= C; c0 += (CB)) {                                        \
    float acc[CB];                                                            \
    for (int c = 0; c < (CB); ++c) acc[c] = bias ? bias[c0 + c] : 0.0f;       \
    for (int k = 0; k < TAPS; ++k) {                                          \
      const int32_t n = nb[k];                                                \
      if (n < 0) continue;                                                    \
      const float *xr = x + (long)n * C + c0, *wr = w + (long)k * C + c0;     \
      for (int c = 0; c < (CB); ++c) acc[c] += xr[c] * wr[c];                 \
    }                                                                         \
    for (int c = 0; c < (CB); ++c) o[c0 + c] = acc[c];                        \
  }

static void forward_rows(const job_t *j) {
  const float *restrict x = j->x, *restrict w = j->w, *restrict bias = j->bias;
  const long C = j->channels;
  for (long m = j->m0; m < j->m1; ++m) {
    const int32_t *nb = j->nbr + m * TAPS;
    float *restrict o = j->out + m * C;
    long c0 = 0;
    FORWARD_CHUNK(32)
    FORWARD_CHUNK(8)
    FORWARD_CHUNK(1)
  }
}

/* one chunk [c0, c0 + CB) of gw[k] += sum over the row block of grad[m] * x[nbr[m, k]] */
#define WGRAD_CHUNK(CB)                                                       \
  for (; c0 + (CB) <= C; c0 += (CB)) {                                        \
    float acc[CB] = {0};                                                      \
    for (long m = b0; m < b1; ++m) {                                          \
      const int32_t n = nbr[m * TAPS + k];                                    \
      if (n < 0) continue;                                                    \
      const float *xr = x + (long)n * C + c0, *gr = grad + m * C + c0;        \
      for (int c = 0; c < (CB); ++c) acc[c] += xr[c] * gr[c];                 \
    }                                                                         \
    for (int c = 0; c < (CB); ++c) g[c0 + c] += acc[c];                       \
  }

static void weight_grad_rows(const job_t *j) {
  const float *restrict x = j->x, *restrict grad = j->grad;
  const int32_t *restrict nbr = j->nbr;
  float *restrict gw = j->out; /* this job's own (49, C) partial sum */
  const long C = j->channels;
  memset(gw, 0, sizeof(float) * TAPS * C);
  for (long b0 = j->m0; b0 < j->m1; b0 += WGRAD_ROW_BLOCK) {
    const long b1 = b0 + WGRAD_ROW_BLOCK < j->m1 ? b0 + WGRAD_ROW_BLOCK : j->m1;
    for (int k = 0; k < TAPS; ++k) {
      float *restrict g = gw + (long)k * C;
      long c0 = 0;
      WGRAD_CHUNK(32)
      WGRAD_CHUNK(8)
      WGRAD_CHUNK(1)
    }
  }
}

static void *forward_thread(void *arg) { forward_rows((const job_t *)arg); return NULL; }
static void *weight_grad_thread(void *arg) { weight_grad_rows((const job_t *)arg); return NULL; }

/* Split rows [0, M) over up to `threads` jobs; job t writes out + t * out_stride.
 * Returns the number of jobs used (the weight gradient's caller sums that many partials). */
static int run_split(job_t base, long M, int threads, long out_stride, void *(*fn)(void *)) {
  long by_size = M / MIN_ROWS_PER_THREAD;
  int t_count = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
  if (by_size < t_count) t_count = by_size < 1 ? 1 : (int)by_size;
  job_t jobs[MAX_THREADS];
  pthread_t ids[MAX_THREADS];
  int started[MAX_THREADS];
  for (int t = 0; t < t_count; ++t) {
    jobs[t] = base;
    jobs[t].m0 = M * t / t_count;
    jobs[t].m1 = M * (t + 1) / t_count;
    jobs[t].out = base.out + (long)t * out_stride;
  }
  for (int t = 1; t < t_count; ++t) started[t] = pthread_create(&ids[t], NULL, fn, &jobs[t]) == 0;
  fn(&jobs[0]);
  for (int t = 1; t < t_count; ++t) {
    if (started[t]) pthread_join(ids[t], NULL);
    else fn(&jobs[t]); /* no thread available: do its share here */
  }
  return t_count;
}

/* out (M, C) = forward; bias may be NULL. */
void sparse_dwconv_rows_f32(const float *x, const int32_t *nbr, const float *w, const float *bias,
                            float *out, long M, long C, int threads) {
  job_t base = {x, w, bias, NULL, nbr, out, 0, M, C};
  run_split(base, M, threads, 0, forward_thread); /* jobs own disjoint rows of one out */
}

/* partials (threads, 49, C): job t writes its sum to partials[t]; returns the jobs used. */
int sparse_dwconv_rows_weight_grad_f32(const float *x, const int32_t *nbr, const float *grad,
                                       float *partials, long M, long C, int threads) {
  job_t base = {x, NULL, NULL, grad, nbr, partials, 0, M, C};
  return run_split(base, M, threads, (long)TAPS * C, weight_grad_thread);
}
