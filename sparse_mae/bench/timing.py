"""The one timing loop of the benchmarks: `sparse-mae bench` (configurations, matmul peak,
loader) and every script under benchmarks/ time through `time_calls`, so warm-up, clocks and
GPU synchronisation are handled once. No model or data imports: a micro-study loads it cheaply.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_calls(fn: Callable[[int], object], warmup: int, repeats: int, device: torch.device | str = "cpu",
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of each of `repeats` calls of fn(k), after `warmup` untimed ones; k counts all
    calls from 0, so a call can draw fresh inputs. On CUDA the device's time (CUDA events);
    elsewhere `clock`: wall time by default, time.thread_time / time.process_time to count
    only this thread's / process's CPU time (a shared machine's other load then does not)."""
    device = torch.device(device)
    for k in range(warmup):
        fn(k)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for k in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(warmup + k)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return times
    for k in range(repeats):
        t0 = clock()
        fn(warmup + k)
        times.append(clock() - t0)
    return times


def median_iqr(times: list[float]) -> tuple[float, float]:
    """The median and interquartile range of timed calls (IQR 0 for a single call)."""
    if len(times) < 2:
        return times[0], 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), q3 - q1
