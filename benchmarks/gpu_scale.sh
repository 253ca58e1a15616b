#!/usr/bin/env bash
# `cora scale` on one GPU machine (issue 16's GPU points), in one prepared run: the demo's synthetic data and MF
# model, then one `cora scale` per (LLM shape, partitioning) point (each under its own time limit, so a slow one
# costs only itself) with the paper's generator, bf16, NCCL and one worker per GPU; the points merged into one report (`cora scale --replan`), MFU against PEAK_TFLOPS.
#
#   bash benchmarks/gpu_scale.sh OUTDIR [SIZES [PARTITIONINGS [WORKERS]]] [key=value ...]
#       SIZES default smollm2-135m-shape,llama-3.2-1b-shape,llama-2-7b-shape; PARTITIONINGS zero3,replicated;
#       WORKERS 1; the key=values go to every point (e.g. engine.leaf_layers=true)
#   env: PYTHON (python3), PEAK_TFLOPS (989: H100/H200 SXM dense bf16), STEPS (14), WARMUP (4), LIMIT (seconds
#        per point, 300), DEVICE_OVERRIDES (the GPU settings; set it to run the same plumbing on a CPU)
#
# OUTDIR gets four files (a device machine returns few): scaling.csv and scaling.md, report.tgz (the report
# directory: those two, the PNG plots and what `cora scale --replan` needs, ranks/*/rank*.json and
# runs/*/config.json; packed again after every point, so a time limit loses only the point it cut) and log.txt
# (every command's stderr). The runs themselves (checkpoints of the paper's generator: hundreds of MB) stay
# under $WORK (default /tmp/cora-scale).
# On a machine without the project's packages: carry .whl/ (benchmarks/gpu_bundle.sh), `source
# benchmarks/gpu_install.sh` first. On one H200 (2026-12-04) the data took 30 s and a point 80 s (the 7B shape's
# 120-150 s: Ray, the imports, the build, 14 steps, the end-of-run checkpoint), so the six default points need
# about 11 minutes: split them by SIZES where a call is limited to 10.
set -u
out=${1:?usage: benchmarks/gpu_scale.sh OUTDIR [SIZES [PARTITIONINGS [WORKERS]]] [key=value ...]}
sizes=${2:-smollm2-135m-shape,llama-3.2-1b-shape,llama-2-7b-shape}
parts=${3:-zero3,replicated}
workers=${4:-1}
shift $(( $# < 4 ? $# : 4 ))
py=${PYTHON:-python3}
peak=${PEAK_TFLOPS:-989}
steps=${STEPS:-14}
warmup=${WARMUP:-4}
work=${WORK:-/tmp/cora-scale}
device=${DEVICE_OVERRIDES-run.device=cuda engine.bf16=true llm.dtype=bfloat16}
cd "$(dirname "$0")/.."
mkdir -p "$out" "$work"
out=$(cd "$out" && pwd)
log="$out/log.txt"
export PYTHONUNBUFFERED=1
cora() { "$py" -m trainer.cli "$@"; }
t0=$(date +%s)
say() { echo "== $(( $(date +%s) - t0 )) s: $*" | tee -a "$log" >&2; }

say "data and MF (as ./launch.sh demo)"
cora prepare --source synthetic --out "$work/data" --users 300 --items 200 --interactions 6000 --factors 4 \
    --rule additive --samples-per-shard 500 --overwrite --no-progress >/dev/null 2>>"$log" || { say "prepare failed"; exit 1; }
cora train-cf --data "$work/data" --model mf --dim 16 --lr 3e-2 --out "$work/cf" --overwrite --no-progress \
    >/dev/null 2>>"$log" || { say "train-cf failed"; exit 1; }

# the paper's generator (hidden 512, 8 layers, 8 heads) and the GPU configs' ZeRO-3 sizes, over the demo config
common=(--config configs/demo.yaml --workers "$workers" --steps "$steps" --warmup "$warmup" --hardware h100
        --peak-tflops "$peak")
# shellcheck disable=SC2206
over=("data.data_dir=$work/data" "data.cf_dir=$work/cf" generator.hidden_size=512 generator.num_layers=8
      generator.num_heads=8 generator.intermediate_size=2048 engine.persistence_threshold=auto
      engine.prefetch_bucket_size=auto $device "$@")
rm -rf "$work/report"
for size in ${sizes//,/ }; do
    for part in ${parts//,/ }; do           # one cora scale per point: a timeout costs that point alone
        say "cora scale $size x $workers ($part) ${over[*]}"
        rm -rf "${work:?}/$size-$part"
        timeout -k 20 "${LIMIT:-300}" "$py" -m trainer.cli scale "${common[@]}" --sizes "$size" --partitioning "$part" \
            --out "$work/$size-$part" "${over[@]}" >/dev/null 2>>"$log"
        say "$size ($part): exit $?"
        # merged into $work/report under the names --replan finds, then packed: what a timeout leaves comes back
        "$py" - "$work/$size-$part" "$work/report" "$part" <<'EOF2' 2>>"$log"
import csv, shutil, sys
from pathlib import Path
src, dst, part = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if not (src / "scaling.csv").is_file():
    sys.exit(f"{src}: no scaling.csv, nothing to merge")
rows = list(csv.DictReader(open(src / "scaling.csv", newline="")))
old = list(csv.DictReader(open(dst / "scaling.csv", newline=""))) if (dst / "scaling.csv").is_file() else []
for r in rows:
    if r["run"]:
        name = f"{r['size']}-w{r['workers']}-{part}"
        shutil.copytree(src / "ranks" / r["run"], dst / "ranks" / name, dirs_exist_ok=True)
        (dst / "runs" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "runs" / r["run"] / "config.json", dst / "runs" / name)
        r["run"] = name
with open(dst / "scaling.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(old + rows)
EOF2
        [[ -f "$work/report/scaling.csv" ]] && tar czf "$out/report.tgz" -C "$work" report
    done
done
if [[ -f "$work/report/scaling.csv" ]]; then
    say "the merged report"
    "$py" -m trainer.cli scale --replan --out "$work/report" --steps "$steps" --warmup "$warmup" --hardware h100 \
        --peak-tflops "$peak" >/dev/null 2>>"$log"
    say "report: exit $?"
    tar czf "$out/report.tgz" -C "$work" report
    cp "$work/report/scaling.md" "$work/report/scaling.csv" "$out/"
    cat "$out/scaling.md" >&2
fi
