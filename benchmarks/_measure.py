"""Small measurement helpers shared by the benchmarks: wall time per training step, peak memory (resident on CPU,
allocated on CUDA), trainer settings per device, and models of real checkpoints' shapes with random weights.

Peak RSS: a daemon thread reads /proc/self/statm every `interval` seconds and keeps the maximum. The thread only reads
a file and compares two ints, and torch kernels release the GIL, so it adds no measurable load. What is reported is
the increase over the RSS measured just before the block, after `release_memory()`; call that between the things
you compare, so memory freed by one is handed back to the OS before the next starts.

Peak CUDA memory: torch's caching allocator counts every live tensor exactly, so `PeakCUDA` reads its high-water mark
(`torch.cuda.max_memory_allocated`, reset at the start of the block) minus what was allocated at the start. Memory
the allocator keeps cached but unused is not counted, nor are the CUDA context and the kernels' code.
"""

import cProfile
import ctypes
import gc
import os
import statistics
import pstats
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, TrainerCallback

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


class PeakCUDA:
    """`with PeakCUDA() as peak: ...` then `peak.increase_mib`: the most CUDA memory allocated at once during the block
    minus what was allocated at its start (torch's allocator statistics, exact)."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.baseline = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()

    @property
    def increase_mib(self) -> float:
        return (self.peak - self.baseline) / MIB


def _synchronize() -> None:
    """Wait for the GPU's queued work, where CUDA is in use: its kernels run asynchronously, so a host clock read
    without this would time their launch, not their run."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepTimes(TrainerCallback):
    """Wall and CPU time (all threads of the process) of each optimizer step, begin to end: generation, scoring,
    forward, backward and optimizer step. On a shared machine the CPU time is the steadier of the two: other jobs
    stretch the wall time of a step more than the work it does. On CUDA both ends wait for the GPU first; the CPU time
    is then the host's (Python, kernel launches, waiting)."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        _synchronize()
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize()
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


def train_measured(build, label: str, profiled: str | None = None, device: str = "cpu"):
    """Build a trainer with `build()` and train it; return its `StepTimes` and its peak memory increase in MiB:
    resident (`PeakRSS`) on `device="cpu"`, CUDA-allocated (`PeakCUDA`) on "cuda". With `profiled` (a regular
    expression of function names), also print a cProfile of the training by cumulative time."""
    release_memory()
    times = StepTimes()
    with PeakCUDA() if device == "cuda" else PeakRSS() as peak:
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


def trainer_settings(device: str) -> dict:
    """`TRAINER_SETTINGS` on "cpu"; on "cuda" the same on the GPU with bf16 autocast (fp32 master weights, as the
    trainers load a checkpoint: TRL's `create_model_from_path` defaults to float32), still without checkpointing."""
    if device == "cpu":
        return TRAINER_SETTINGS
    return dict(TRAINER_SETTINGS, use_cpu=False, bf16=True)


# The shapes of real checkpoints (from their config.json), for models with random weights built in-process: the
# benchmarks measure cost, which depends on the shape alone, and no checkpoint needs to travel (the GPU machine takes
# at most 64 MiB of files). All four tie the LM head to the embedding.
REAL_SHAPES = {
    "smollm2-135m": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
        vocab_size=49152, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e5},
        max_position_embeddings=8192)),
    "smollm2-360m": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560,
        vocab_size=49152, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e5},
        max_position_embeddings=8192)),
    "qwen2.5-0.5b": (Qwen2Config, Qwen2ForCausalLM, dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
        vocab_size=151936, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        max_position_embeddings=32768)),
    "qwen2.5-1.5b": (Qwen2Config, Qwen2ForCausalLM, dict(
        hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
        vocab_size=151936, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        max_position_embeddings=32768)),
}


def save_real_shape(name: str, tokenizer, path: Path, num_layers: int | None = None, seed: int = 0,
                    device: str = "cpu") -> str:
    """Save to `path` a model of the shape `REAL_SHAPES[name]` (with `num_layers` layers instead, if given) with random
    weights from `seed`, in fp32, with `tokenizer` (its special tokens set in the config), and return the path. It is
    initialised on `device` (fast on a GPU for the larger shapes). The embedding keeps the real vocabulary, larger than
    the test tokenizer's: sampled ids past it decode to nothing, which every trainer handles alike."""
    config_class, model_class, fields = REAL_SHAPES[name]
    fields = dict(fields, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(config_class(**fields)).float()
    print(f"{name}{'' if num_layers is None else f' ({num_layers} layers)'}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    release_memory()
    return str(path)
