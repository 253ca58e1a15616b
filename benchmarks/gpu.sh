#!/usr/bin/env bash
# The GPU figures, in one prepared run (a GPU machine's time is short): the device and its measured bf16
# matrix rate, the trainer's ZeRO-3 step on CUDA (NCCL, bf16) timed against the frozen LLM and LoRA, and
# one-process CoRA / LoRA / peft / the frozen LLM in bf16 on the SmolLM2-135M, Llama-3.2-1B and Llama-2-7B
# shapes with tokens/s and MFU; and where the trainer's step goes (benchmarks/profile_step.py).
#
#   bash benchmarks/gpu.sh OUTDIR [PEAK_TFLOPS [NAMES]]   PEAK_TFLOPS: the MFU's denominator, default 989 (the
#                                                        H100/H200 SXM dense bf16 datasheet figure); NAMES: a
#                                                        comma-separated subset of the measurements below
#
# Each measurement runs under its own time limit and writes OUTDIR/NAME.json (benchmarks/injection.py's
# --json output); OUTDIR/log.txt holds every command, its exit status, its seconds and its stderr;
# OUTDIR/summary.json all the measurements' JSON by name (one file to bring back).
# $PYTHON (default python3) must have the project's dependencies and a CUDA build of torch; on a machine without
# them and without a package index, carry .whl/ from benchmarks/gpu_bundle.sh and `source benchmarks/gpu_install.sh`.
set -u
out=${1:?usage: benchmarks/gpu.sh OUTDIR [PEAK_TFLOPS [NAMES]]}
peak=${2:-989}
only=${3:-}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
log="$out/log.txt"
: >"$log"
export PYTHONUNBUFFERED=1

measure() {   # measure SCRIPT NAME SECONDS ARGS...: benchmarks/SCRIPT --json ARGS on CUDA in bf16 under a time
              # limit, its JSON to OUTDIR/NAME.json
    local script=$1 name=$2 limit=$3 t0 rc
    shift 3
    [[ -z "$only" || ",$only," == *",$name,"* ]] || return 0
    echo "== $name: $script $*" >>"$log"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$py" "benchmarks/$script" --json --device cuda --dtype bfloat16 "$@" \
        >"$out/$name.json" 2>>"$log"
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s" >>"$log"
}
step() { measure injection.py "$1" "$2" --peak-tflops "$peak" "${@:3}"; }      # step NAME SECONDS ARGS...

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$py" - <<'EOF'
import time, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      torch.cuda.get_device_name())
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    a @ b
torch.cuda.synchronize()
print(f"bf16 8192^3 matmul: {10 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s (measured ceiling)")
EOF
} >"$out/env.txt" 2>>"$log"

# the trainer's step (trainer.engine + trainer.worker.train_step) on CUDA: ZeRO-3 on NCCL, bf16, 1 rank; the
# frozen LLM partitioned by ZeRO-3 or replicated (engine.partitioning); a replicated base trains the generator and
# P under ZeRO stage 2 (engine.zero_stage), with CoRA under ZeRO-3 timed beside it (cora_stage3)
step zero3 200 --zero3 1 --zero3-only --reps 7 --warmup 2
step replicated 200 --zero3 1 --zero3-only --reps 7 --warmup 2 --partitioning replicated
step zero3-1b 200 --zero3 1 --zero3-only --reps 5 --warmup 2 --shape llama-3.2-1b-shape
step replicated-1b 200 --zero3 1 --zero3-only --reps 5 --warmup 2 --shape llama-3.2-1b-shape --partitioning replicated
step replicated-leaf 200 --zero3 1 --zero3-only --reps 7 --warmup 2 --partitioning replicated --zero-stage 3 --leaf-layers
step replicated-1b-leaf 200 --zero3 1 --zero3-only --reps 5 --warmup 2 --shape llama-3.2-1b-shape \
    --partitioning replicated --zero-stage 3 --leaf-layers
# where the trainer's step goes on the GPU (benchmarks/profile_step.py: torch.profiler, kernel launches, host
# waits, hooked modules), the 135M shape, replicated, per module and per layer
profile() { measure profile_step.py "$@"; }                                    # profile NAME SECONDS ARGS...
profile profile-replicated 150 --partitioning replicated
profile profile-replicated-leaf 150 --partitioning replicated --zero-stage 3 --leaf-layers  # leaf layers: ZeRO-3 only
profile profile-replicated-auto 150 --partitioning replicated --auto-sizes      # cora train's GPU settings
profile profile-replicated-stages 150 --partitioning replicated --variants frozen,cora,cora_stage3   # stage 2 vs 3
# one process, the issue's configuration (batch 8, 128 tokens) and a larger one
step smollm2-135m 90 --reps 15 --warmup 3
step smollm2-135m-dropout0 90 --reps 15 --warmup 3 --dropout 0 --skip naive
step smollm2-135m-b32-t256 90 --reps 9 --warmup 2 --batch 32 --seq 256 --skip naive
step llama-3.2-1b 120 --shape llama-3.2-1b-shape --reps 9 --warmup 2 --skip naive,peft,frozen_full_logits
step llama-2-7b 150 --shape llama-2-7b-shape --reps 7 --warmup 2 --skip naive,peft,frozen_full_logits
step llama-2-7b-b16-t256 150 --shape llama-2-7b-shape --reps 7 --warmup 2 --batch 16 --seq 256 \
    --skip naive,peft,frozen_full_logits

"$py" - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
parts = {}
for f in sorted(out.glob("*.json")):
    if f.name != "summary.json":
        try:
            parts[f.stem] = json.loads(f.read_text())
        except ValueError:
            parts[f.stem] = None           # the step failed or ran out of time: log.txt says which
(out / "summary.json").write_text(json.dumps(parts))
EOF
