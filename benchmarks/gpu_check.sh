#!/usr/bin/env bash
# The GPU check (issue #12, section 5): everything of ours that only a GPU exercises, in one run of under 8 minutes
# on a machine with one NVIDIA GPU and no network (Python 3.12, torch for CUDA, transformers, accelerate, peft and
# triton preinstalled; trl, datasets and math-verify absent, so they travel as wheels, with this project's own).
#
# 1. Prepare, here (with network), from the repo root:
#        bash benchmarks/gpu_check.sh prepare
#        echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"   # once: keep the wheels out of git
#    `prepare` empties .whl/ and downloads into it the wheels for CPython 3.12 on manylinux x86-64 of every missing
#    package, with pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#    --platform manylinux_2_28_x86_64 (and 2_27, 2_17, 2014, 1), pinned to the versions the CPU suite runs with (see
#    WHEELS); builds this project's wheel (pip wheel --no-deps . -w .whl); and checks that each name is there once
#    (two versions stop the whole install), that every Requires-Dist of every wheel (for Python 3.12, no extras) is a
#    wheel here or in PRESENT, and that the wheels stay under 16 MiB (the working tree and what is carried may be
#    64 MiB together).
# 2. Run, on the GPU machine, from the repo root, with .whl/ copied along:
#        bash benchmarks/gpu_check.sh
#    It installs the wheels into /tmp/site, puts that on PYTHONPATH, prints the versions and nvidia-smi, then, within
#    BUDGET_S seconds in all (each stage also within its own cap, and skipped when the budget is spent):
#      (a) the gpu-marked tests, tests/test_gpu.py (losses in bf16 against TRL's and our fp32 values, 3 bf16 steps of
#          each trainer with HF generation, TRL's Triton fused LM head against our projection);
#      (b) benchmarks/losses.py at V=151,936, T=4,096, H=896, fp32 and bf16 inputs: time and peak CUDA memory
#          against TRL's chunked JSD and SDPO's loss utils;
#      (c) benchmarks/sdpo_vs_trl.py (sdpo-logits) and benchmarks/opd_vs_trl.py in bf16 on the GPU at the shapes of
#          SmolLM2-135M and Qwen2.5-0.5B with random weights: step time and peak CUDA memory against TRL's
#          SDPOTrainer and DistillationTrainer.
#    Everything printed also goes to $OUT/gpu_check.log when OUT is set (a folder whose files are collected after
#    the run), each stage's output to $OUT/<stage>.log, and a one-line-per-stage summary to $OUT/summary.txt. The
#    exit status is non-zero when any stage failed or ran out of time (a failed test included); the summary says
#    which.
set -euo pipefail
cd "$(dirname "$0")/.."

# The missing packages, at the versions the CPU suite is tested with (the dev .venv): trl, which the trainers
# subclass; datasets and its dill and multiprocess; math-verify and its latex2sympy2_extended and antlr4 runtime.
WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 math-verify==0.9.0
        latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2)
# What those wheels (and this project) require that the GPU machine already has (its image's package list).
PRESENT=(accelerate filelock fsspec huggingface-hub jinja2 numpy packaging pandas psutil pyarrow pyyaml requests sympy
         torch tqdm transformers xxhash)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
MAX_WHEELS_MIB=16
BUDGET_S=440  # the stages together, leaving the install and the version print 40 s of the 8 minutes
SITE=/tmp/site

prepare() {
    rm -rf .whl
    mkdir .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
    python3 -m pip wheel -q --no-deps . -w .whl
    python3 - "$MAX_WHEELS_MIB" "${PRESENT[@]}" <<'EOF'
"""Check .whl/: one version per name, every requirement (Python 3.12 on Linux x86-64, no extras) among the wheels or
the names given, and the total size."""
import sys
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

max_mib, present = float(sys.argv[1]), {canonicalize_name(name) for name in sys.argv[2:]}
environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
wheels = sorted(Path(".whl").glob("*.whl"))
names = [canonicalize_name(w.name.split("-")[0]) for w in wheels]
duplicates = {name for name in names if names.count(name) > 1}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is None or requirement.marker.evaluate(environment):
                name = canonicalize_name(requirement.name)
                if name not in names and name not in present:
                    missing.append(f"{wheel.name} needs {requirement}")
total_mib = sum(w.stat().st_size for w in wheels) / 2**20
for wheel in wheels:
    print(f"  {wheel.name}  {wheel.stat().st_size / 2**20:.2f} MiB")
print(f"{len(wheels)} wheels, {total_mib:.1f} MiB")
problems = [f"more than one version of {name}" for name in sorted(duplicates)] + missing
if total_mib > max_mib:
    problems.append(f"{total_mib:.1f} MiB of wheels, more than {max_mib:.0f}")
for problem in problems:
    print(f"PROBLEM: {problem}")
sys.exit(1 if problems else 0)
EOF
    if [ -x .venv/bin/python ]; then  # the pins should be what the CPU suite runs with
        .venv/bin/python - "${WHEELS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for pin in sys.argv[1:]:
    name, pinned = pin.split("==")
    try:
        here = version(name)
    except PackageNotFoundError:
        here = "not installed"
    if here != pinned:
        print(f"WARNING: {name} is {pinned} in the wheels but {here} in .venv")
EOF
    fi
    if ! git check-ignore -q .whl/probe.whl; then
        echo "Keep the wheels out of git (once):  echo /.whl/ >> \"$(git rev-parse --git-path info/exclude)\""
    fi
    echo "Prepared .whl/. On the GPU machine, from the repo root, with .whl carried:  bash benchmarks/gpu_check.sh"
}

# ------------------------------------------------------------------------------------------------------------------
# The run on the GPU machine.

LOG=/dev/null
SUMMARY=()
FAILED=0

say() {
    echo "$@" | tee -a "$LOG"
}

# stage NAME CAP_S COMMAND...: run COMMAND within min(CAP_S, what is left of BUDGET_S), its output to stdout, the log
# and $OUT/NAME.log; record its outcome.
stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 30 ]; then
        SUMMARY+=("$name: skipped, the time budget of $BUDGET_S s is spent")
        FAILED=1
        return
    fi
    local limit=$((cap < left ? cap : left)) stage_log=/dev/null
    if [ -n "${OUT:-}" ]; then stage_log=$OUT/$name.log; fi
    say "=== $name (at most $limit s): $*"
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" "$stage_log" || rc=${PIPESTATUS[0]}
    local outcome="passed"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        outcome="ran out of its $limit s"
        FAILED=1
    elif [ "$rc" -ne 0 ]; then
        outcome="FAILED (exit status $rc)"
        FAILED=1
    fi
    SUMMARY+=("$name: $outcome in $((SECONDS - start)) s")
}

run() {
    DEADLINE=$((SECONDS + BUDGET_S))
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        LOG=$OUT/gpu_check.log
        rm -f "$OUT"/*.log "$OUT/summary.txt"
    fi
    local wheels=(.whl/*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        echo "No wheels in .whl/: run 'bash benchmarks/gpu_check.sh prepare' first (with network), then carry .whl." >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        2>&1 | tee -a "$LOG"
    export PYTHONPATH=$SITE
    # Imports come from the installed wheel, never from ./selfdistill (which lacks the trainers and rewards
    # subpackages that pyproject.toml maps in): no Python puts the current folder or a script's folder on sys.path.
    export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
    say "=== versions"
    python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

import selfdistill


def installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


names = ["torch", "transformers", "accelerate", "peft", "triton", "trl", "datasets", "math-verify", "selfdistill"]
print(f"Python {platform.python_version()}; " + ", ".join(f"{name} {installed(name)}" for name in names))
print(f"selfdistill from {selfdistill.__file__}")
cuda = torch.cuda.is_available()
print(f"CUDA {torch.version.cuda}, available: {cuda}{', ' + torch.cuda.get_device_name() if cuda else ''}")
if not cuda:
    raise SystemExit("No CUDA device: the gpu-marked tests would all be skipped. Stopping.")
EOF
    nvidia-smi 2>&1 | tee -a "$LOG" || true

    stage tests 200 python3 -m pytest tests/test_gpu.py -m gpu -p no:cacheprovider -q -rA
    stage losses 120 bash -c "python3 benchmarks/losses.py --device cuda --vocab 151936 --tokens 4096 --max-gib 100 \
        && python3 benchmarks/losses.py --device cuda --vocab 151936 --tokens 4096 --max-gib 100 --dtype bfloat16"
    stage sdpo 150 python3 benchmarks/sdpo_vs_trl.py --device cuda --sizes smollm2-135m qwen2.5-0.5b --pairs sdpo-logits
    stage opd 150 python3 benchmarks/opd_vs_trl.py --device cuda --sizes smollm2-135m qwen2.5-0.5b --rounds 1

    say "=== summary ($SECONDS s in all)"
    for line in "${SUMMARY[@]}"; do
        say "$line"
        if [ -n "${OUT:-}" ]; then echo "$line" >>"$OUT/summary.txt"; fi
    done
    exit "$FAILED"
}

case "${1:-run}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [prepare | run]" >&2; exit 2 ;;
esac
