/* The kernels' threads: persistent workers, asleep on a condition variable between calls.
 *
 * Why not a thread per call: a training step makes ~1000 kernel calls, and creating and
 * joining a pthread per call costs tens of microseconds each. Why not OpenMP: torch ships
 * its own OpenMP runtime, and two runtimes in one process spin against each other on few
 * cores. Workers never spin; the calling thread does its own share (t = 0) and then waits
 * briefly for the others, which run equal shares of the same work. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

#include "common.h"

#define MAX_WORKERS 255

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t callers = PTHREAD_MUTEX_INITIALIZER; /* one pool_run at a time */
static int workers;                                         /* started so far */
static unsigned long generation;                            /* bumped per call */
static task_fn job_fn;
static void *job_ctx;
static int job_n;
static atomic_int pending;
static int atfork_registered;
static unsigned long first_generation[MAX_WORKERS + 1]; /* the generation a worker was started in */

static void *worker_main(void *arg) {
  const int id = (int)(intptr_t)arg; /* 1..MAX_WORKERS */
  pthread_mutex_lock(&lock);
  /* not `generation` now: the caller that started this worker may already have bumped it */
  unsigned long seen = first_generation[id];
  for (;;) {
    while (generation == seen) pthread_cond_wait(&wake, &lock);
    seen = generation;
    task_fn fn = job_fn;
    void *ctx = job_ctx;
    const int n = job_n;
    pthread_mutex_unlock(&lock);
    if (id < n) {
      fn(ctx, id, n);
      atomic_fetch_sub_explicit(&pending, 1, memory_order_release);
    }
    pthread_mutex_lock(&lock);
  }
  return NULL;
}

/* a forked child has none of the parent's workers: start again from none */
static void reset_in_child(void) {
  pthread_mutex_init(&lock, NULL);
  pthread_cond_init(&wake, NULL);
  pthread_mutex_init(&callers, NULL);
  workers = 0;
  generation = 0;
}

/* start workers up to `wanted`; returns how many exist (fewer if the system refuses) */
static int ensure_workers(int wanted) {
  if (!atfork_registered) {
    pthread_atfork(NULL, NULL, reset_in_child);
    atfork_registered = 1;
  }
  while (workers < wanted) {
    pthread_t id;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    /* the worker runs every generation after the current one, however late it starts */
    first_generation[workers + 1] = generation;
    int failed = pthread_create(&id, &attr, worker_main, (void *)(intptr_t)(workers + 1));
    pthread_attr_destroy(&attr);
    if (failed) break;
    workers++;
  }
  return workers;
}

int pool_run(task_fn fn, void *ctx, int n) {
  if (n > MAX_WORKERS + 1) n = MAX_WORKERS + 1;
  if (n <= 1) {
    fn(ctx, 0, 1);
    return 1;
  }
  pthread_mutex_lock(&callers);
  const int available = ensure_workers(n - 1);
  if (available < n - 1) n = available + 1;
  if (n <= 1) {
    pthread_mutex_unlock(&callers);
    fn(ctx, 0, 1);
    return 1;
  }
  pthread_mutex_lock(&lock);
  job_fn = fn;
  job_ctx = ctx;
  job_n = n;
  atomic_store_explicit(&pending, n - 1, memory_order_relaxed);
  generation++;
  pthread_cond_broadcast(&wake);
  pthread_mutex_unlock(&lock);
  fn(ctx, 0, n);
  while (atomic_load_explicit(&pending, memory_order_acquire) > 0) sched_yield();
  pthread_mutex_unlock(&callers);
  return n;
}
