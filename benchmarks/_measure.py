"""Small measurement helpers shared by the benchmarks: wall time per training step and peak resident memory.

Peak RSS: a daemon thread reads /proc/self/statm every `interval` seconds and keeps the maximum. The thread only reads
a file and compares two ints, and torch kernels release the GIL, so it adds no measurable load. What is reported is
the increase over the RSS measured just before the block, after `release_memory()`; call that between the things
you compare, so memory freed by one is handed back to the OS before the next starts.
"""

import cProfile
import ctypes
import gc
import os
import statistics
import pstats
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


def train_measured(build, label: str, profiled: str | None = None):
    """Build a trainer with `build()` and train it; return its `StepTimes` and its peak RSS increase in MiB. With
    `profiled` (a regular expression of function names), also print a cProfile of the training by cumulative time."""
    release_memory()
    times = StepTimes()
    with PeakRSS() as peak:
        trainer = build()
        trainer.add_callback(times)
        profiler = cProfile.Profile() if profiled else None
        if profiler:
            profiler.enable()
        trainer.train()
        if profiler:
            profiler.disable()
            print(f"\n### cProfile, {label}: the parts of a step, by cumulative time")
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(profiled)
    del trainer
    release_memory()
    return times, peak.increase_mib


def alternating_rounds(run, rounds: int, profile: bool, label: str) -> dict:
    """Run ours and TRL's trainer `rounds` times each, in alternating order (so load hits both alike), with
    `run(kind, profile) -> (StepTimes, peak MiB)`, profiling the last round if asked. Returns, per kind, the median
    wall and CPU seconds of the steps after each run's first (warm-up), the minimum CPU seconds and the largest peak."""
    wall, cpu, mib = {"ours": [], "trl": []}, {"ours": [], "trl": []}, {"ours": [], "trl": []}
    for round_ in range(rounds):
        for kind in ["ours", "trl"] if round_ % 2 == 0 else ["trl", "ours"]:
            times, peak = run(kind, profile and round_ == rounds - 1)
            wall[kind] += times.wall[1:]
            cpu[kind] += times.cpu[1:]
            mib[kind].append(peak)
            print(f"{label} round {round_} {kind}: wall {[round(s, 2) for s in times.wall]} s, "
                  f"cpu {[round(s, 2) for s in times.cpu]} s, +{peak:.0f} MiB", flush=True)
    return {kind: (statistics.median(wall[kind]), statistics.median(cpu[kind]), min(cpu[kind]), max(mib[kind]))
            for kind in ("ours", "trl")}


# Trainer settings shared by the step benchmarks: sampling with no top-k/top-p, fp32 without gradient checkpointing
# (TRL's defaults turn bf16 autocast and checkpointing on), CPU, nothing saved or logged (a callback times the steps).
TRAINER_SETTINGS = dict(
    learning_rate=1e-5, temperature=1.0, top_k=0, top_p=1.0, seed=0, bf16=False, gradient_checkpointing=False,
    use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
)
