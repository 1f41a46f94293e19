"""Small measurement helpers shared by the benchmarks: wall time per training step and peak resident memory.

Peak RSS: a daemon thread reads /proc/self/statm every `interval` seconds and keeps the maximum. The thread only reads
a file and compares two ints, and torch kernels release the GIL, so it adds no measurable load. What is reported is
the increase over the RSS measured just before the block, after `release_memory()`; call that between the things
you compare, so memory freed by one is handed back to the OS before the next starts.
"""

import ctypes
import gc
import os
import threading
import time

from transformers import TrainerCallback

_PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def release_memory() -> None:
    """Collect garbage, then ask glibc to return its free heap pages to the OS (else RSS only ever grows)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class PeakRSS:
    """`with PeakRSS() as peak: ...` then `peak.increase_mib`: max RSS during the block minus RSS at its start."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval

    def __enter__(self):
        self.baseline = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def increase_mib(self) -> float:
        return (self.peak - self.baseline) / MIB


class StepTimes(TrainerCallback):
    """Wall and CPU time (all threads of the process) of each optimizer step, begin to end: generation, scoring,
    forward, backward and optimizer step. On a shared machine the CPU time is the steadier of the two: other jobs
    stretch the wall time of a step more than the work it does."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])
