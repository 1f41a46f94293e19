"""Side-by-side: `selfdistill.losses.jsd` against TRL 1.16's logit-level distillation losses, forward + backward.

For each shape (B=1, T completion tokens, vocabulary V, hidden size H) it builds one student and one teacher hidden
state `(1, T, H)` and two `nn.Linear(H, V)` heads (no bias, as Qwen2.5), with the student's hidden states and head
weight trainable, and runs on these identical inputs, β=0.5 (generalized JSD), temperature 1:

  ours full      `jsd(h_s, h_t, mask, student_head=, teacher_head=)` over the full vocabulary
  ours top-k     the same with `top_k=100, support="student", add_tail=True`
  TRL chunked    `trl.trainer.distillation_trainer._chunked_divergence_loss` (DistillationTrainer's loss, from hidden
                 states and lm_head weights; on CPU it folds 4096 × 32768 tiles in torch)
  TRL SDPO full  logits = h @ Wᵀ materialised as SDPOTrainer's model forward does (student with grad, teacher without,
                 then `/ temperature`), `compute_full_logit_self_distillation_loss`
  TRL SDPO top-k the same logits, `compute_topk_self_distillation_loss(distillation_topk=100, add_tail=True)`

each reduced to the mean over tokens and back-propagated. Ours is compared with the TRL function that computes the
same quantity: ours full with TRL chunked and TRL SDPO full, ours top-k with TRL SDPO top-k.

Measured per case:
- time: wall seconds of forward + backward, median over `--reps` runs. The first run is a warm-up unless it took
  over 10 s (then first-call costs are negligible and it counts); a case stops early once it has used
  `--case-budget-s`. Also the process CPU seconds (all threads, `time.process_time`): the machine is shared, and
  other jobs inflate wall time far more than CPU time, so compare ratios in both.
- peak memory: the kernel's resident-set high-water mark (VmHWM in /proc/self/status) minus the resident set at the
  start of the run. Before each run the garbage collector runs, `malloc_trim(0)` returns freed heap memory to the
  kernel, and writing "5" to /proc/self/clear_refs resets the high-water mark to the current resident set, so the
  number is exact (every page the run touched at its peak, gradients included), not sampled. The inputs and heads
  exist before the run and are not counted; the student head's weight gradient (V·H fp32, the same for every
  method: 519 MiB at V=152k, H=896) is.
- agreement: max |Δ| of the per-token losses against TRL SDPO and of the mean loss against TRL chunked (which
  returns only the mean), and max |Δ| of the gradient with respect to the student's hidden states. (SDPO's tail,
  `log(1 − Σ_K p)` in fp32, is the less precise side of the top-k difference; see tests/test_losses.py.)

TRL SDPO cases whose estimated peak exceeds `--max-gib` are skipped ("skipped (OOM risk)").

On a GPU (`--device cuda`): the inputs are the same numbers (drawn on the CPU, then moved); each run starts and ends
with `torch.cuda.synchronize()`, so the time is the GPU's work and not its launch; the first run is always a warm-up
(it compiles TRL's Triton kernels); the peak is the most CUDA memory
allocated during the run (`torch.cuda.reset_peak_memory_stats()` before it, `max_memory_allocated()` after) minus what
was allocated at its start, exact as on CPU; CPU seconds are not reported (the host mostly waits). `--dtype bfloat16`
gives the hidden states and heads in bf16, as a bf16 model hands them over: TRL SDPO's logits are then bf16, as its
model's forward returns them; ours and TRL chunked compute in fp32 from the bf16 values (the agreement columns then
show bf16 rounding, not error). fp32 matmuls run in full fp32 (torch's default, no TF32).

Commands (CPU; the machine's other jobs make times noisy, run nothing else heavy meanwhile):
    python benchmarks/losses.py            # the README table: V ∈ {32k, 152k} × T ∈ {1k, 4k}, H=896 (about 30 min)
    python benchmarks/losses.py --quick    # one small shape, a few seconds (`make demo`)
One GPU (benchmarks/gpu_check.sh runs these):
    python benchmarks/losses.py --device cuda --vocab 151936 --tokens 4096 --max-gib 100
    python benchmarks/losses.py --device cuda --vocab 151936 --tokens 4096 --max-gib 100 --dtype bfloat16
"""

import argparse
import ctypes
import gc
import math
import re
import statistics
import time

import torch
from trl.experimental.sdpo import loss_utils as sdpo
from trl.trainer.distillation_trainer import _chunked_divergence_loss

from selfdistill import losses

LIBC = ctypes.CDLL("libc.so.6")
# Peak of TRL SDPO loss + backward in units of one fp32 (T, V) tensor, measured here (full: 13 at V=152k, T=1k),
# with a margin; only used to skip shapes that would not fit. Keyed by "full vocabulary".
SDPO_PEAK_TENSORS = {True: 14, False: 10}


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) / 1024


def _reset_peak(device: str = "cpu") -> float:
    """Free what can be freed and reset the memory high-water mark; return the memory in use (MiB): the resident set
    on CPU, the CUDA allocation on "cuda"."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def _peak(device: str = "cpu") -> float:
    """The high-water mark (MiB) since `_reset_peak`."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mib("VmHWM")


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_inputs(T: int, V: int, H: int, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Student and teacher hidden states `(1, T, H)` and heads `(V, H)`, drawn on the CPU (the same numbers on every
    device), then moved to `device` and `dtype`."""
    g = torch.Generator().manual_seed(seed)
    student_head, teacher_head = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():  # logits with a spread like a trained LM's (std ≈ 3); teacher a perturbed student
        student_head.weight.copy_(torch.randn(V, H, generator=g) * (3 / math.sqrt(H)))
        teacher_head.weight.copy_(student_head.weight + torch.randn(V, H, generator=g) * (1 / math.sqrt(H)))
    student_head.to(device, dtype)
    teacher_head.to(device, dtype).requires_grad_(False)
    h_s = torch.randn(1, T, H, generator=g)
    h_t = h_s + 0.5 * torch.randn(1, T, H, generator=g)
    return {
        "h_s": h_s.to(device, dtype).requires_grad_(),
        "h_t": h_t.to(device, dtype),
        "student_head": student_head,
        "teacher_head": teacher_head,
        "mask": torch.ones(1, T, dtype=torch.bool, device=device),
    }


def ours(x, beta, top_k=None):
    heads = {"student_head": x["student_head"], "teacher_head": x["teacher_head"]}
    per_token = losses.jsd(x["h_s"], x["h_t"], x["mask"], beta=beta, top_k=top_k, add_tail=True, **heads)
    return losses.masked_mean(per_token, x["mask"]), per_token


def trl_chunked(x, beta, top_k=None):
    loss, _, _ = _chunked_divergence_loss(
        x["h_s"], x["h_t"], x["student_head"].weight, x["teacher_head"].weight, x["mask"], beta
    )
    return loss, loss


def trl_sdpo(x, beta, top_k=None, temperature=1.0):
    logits_s = x["student_head"](x["h_s"]) / temperature  # SDPOTrainer._forward_logits: model(...).logits / τ
    with torch.no_grad():
        logits_t = x["teacher_head"](x["h_t"]) / temperature
    if top_k is None:
        per_token = sdpo.compute_full_logit_self_distillation_loss(logits_s, logits_t, distillation_alpha=beta)
    else:
        per_token = sdpo.compute_topk_self_distillation_loss(
            logits_s, logits_t, distillation_topk=top_k, distillation_alpha=beta, distillation_add_tail=True
        )
    return losses.masked_mean(per_token, x["mask"]), per_token


def run_case(fn, x, beta, top_k, reps: int, case_budget_s: float, device: str = "cpu"):
    """Runs of forward + backward; returns (median wall s, median CPU s, peak MiB, values, grad of h_s, runs timed).

    The first run is a warm-up unless it took over 10 s (first-call costs are then negligible and it counts), and
    always on CUDA (where it compiles the Triton kernels); runs stop after `reps` timed ones or once the case has
    used `case_budget_s`.
    """
    walls, cpus, peaks, spent = [], [], [], 0.0
    for i in range(reps + 1):
        x["h_s"].grad = None
        x["student_head"].weight.grad = None
        base = _reset_peak(device)
        wall, cpu = time.perf_counter(), time.process_time()
        loss, values = fn(x, beta, top_k)
        loss.backward()
        _synchronize(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = _peak(device) - base
        values, grad = values.detach().float().reshape(-1), x["h_s"].grad.float().reshape(-1)
        del loss
        spent += wall
        if i == 0 and (wall < 10 or device == "cuda"):
            continue
        walls.append(wall)
        cpus.append(cpu)
        peaks.append(peak)
        if len(walls) == reps or spent > case_budget_s:
            break
    return statistics.median(walls), statistics.median(cpus), max(peaks), values, grad, len(walls)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape (V=32k, T=256, H=256), one run")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 151936])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--hidden", type=int, default=896, help="896 as Qwen2.5-0.5B")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--case-budget-s", type=float, default=90.0, help="no further runs once a case used this")
    parser.add_argument("--max-gib", type=float, default=16.0, help="skip TRL SDPO cases estimated above this")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="of the hidden states and heads (see the module docstring)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.quick:
        args.vocab, args.tokens, args.hidden, args.reps = [32768], [256], 256, 1

    torch.manual_seed(0)
    rows = []
    for V in args.vocab:
        for T in args.tokens:
            shape = f"V={V} T={T}"
            x = make_inputs(T, V, args.hidden, device=args.device, dtype=dtype)
            results = {}
            cases = [
                ("ours full", ours, None, None),
                ("TRL chunked", trl_chunked, None, "ours full"),
                ("TRL SDPO full", trl_sdpo, None, "ours full"),
                ("ours top-k", ours, args.top_k, None),
                ("TRL SDPO top-k", trl_sdpo, args.top_k, "ours top-k"),
            ]
            for name, fn, top_k, ref in cases:
                if fn is trl_sdpo and SDPO_PEAK_TENSORS[top_k is None] * T * V * 4 > args.max_gib * 2**30:
                    print(f"{shape:18s} {name:15s} skipped (OOM risk)", flush=True)
                    rows.append((shape, name, None))
                    continue
                wall, cpu, peak, values, grad, runs = run_case(fn, x, args.beta, top_k, args.reps, args.case_budget_s,
                                                               args.device)
                results[name] = (wall, cpu, peak, values, grad)
                ratios = dv = dg = None
                if ref is not None:
                    wall_ref, cpu_ref, peak_ref, values_ref, grad_ref = results[ref]
                    ratios = (wall_ref / wall, cpu_ref / cpu, peak_ref / peak)
                    if values.numel() == 1:  # TRL chunked returns only the mean
                        values_ref = values_ref.mean(0, keepdim=True)
                    dv = (values_ref - values).abs().max().item()
                    dg = (grad_ref - grad).abs().max().item()
                rows.append((shape, name, (wall, cpu, peak, ratios, dv, dg)))
                print(f"{shape:18s} {name:15s} {wall:.2f} s, {cpu:.2f} CPU s, {peak:.0f} MiB ({runs} runs)", flush=True)
            del x, results
            _reset_peak(args.device)

    if args.device == "cpu":
        print_table_cpu(rows)
        where = f"{torch.get_num_threads()} threads"
    else:
        print_table_cuda(rows)
        where = torch.cuda.get_device_name()
    print(f"\nH={args.hidden}, B=1, β={args.beta}, top-k={args.top_k} with tail, {args.dtype} inputs, {where}.")


def print_table_cpu(rows):
    print(
        "\n| shape | method | time s | CPU s | peak MiB | ours/TRL time (CPU) | ours/TRL mem | max\\|Δ loss\\| "
        "| max\\|Δ ∂h\\| |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape, name, r in rows:
        if r is None:
            print(f"| {shape} | {name} | skipped (OOM risk) | | | | | | |")
            continue
        wall, cpu, peak, ratios, dv, dg = r
        vs = "| | |" if ratios is None else f"{ratios[0]:.2f} ({ratios[1]:.2f}) | {ratios[2]:.2f} | {dv:.1e} | {dg:.1e}"
        print(f"| {shape} | {name} | {wall:.2f} | {cpu:.2f} | {peak:.0f} | {vs} |")


def print_table_cuda(rows):
    print("\n| shape | method | time ms | peak CUDA MiB | ours/TRL time | ours/TRL mem | max\\|Δ loss\\| "
          "| max\\|Δ ∂h\\| |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape, name, r in rows:
        if r is None:
            print(f"| {shape} | {name} | skipped (OOM risk) | | | | | |")
            continue
        wall, _, peak, ratios, dv, dg = r
        vs = "| |" if ratios is None else f"{ratios[0]:.2f} | {ratios[2]:.2f} | {dv:.1e} | {dg:.1e}"
        print(f"| {shape} | {name} | {1000 * wall:.1f} | {peak:.0f} | {vs} |")


if __name__ == "__main__":
    main()
