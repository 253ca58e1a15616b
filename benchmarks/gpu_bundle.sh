#!/usr/bin/env bash
# Packs what a GPU machine without this project's packages needs to run it (`cora train`, `cora scale`,
# benchmarks/gpu.sh) into .whl/ (ignored by git), for a machine that cannot reach a package index and takes at
# most 64 MiB a call: this workplace's device tool, whose image has CUDA torch, numpy, pandas, pyarrow, aiohttp,
# grpcio, tokenizers, ... but not DeepSpeed, Ray or this project's pins of transformers and peft.
#
#   bash benchmarks/gpu_bundle.sh            here, with the virtualenv set up (./launch.sh setup)
#   source benchmarks/gpu_install.sh         there, in the repository root: installs into /tmp/site
#
# .whl/ then holds, for CPython 3.12 on x86-64: wheels of the packages below (resolved with their dependencies,
# then only those the image lacks kept), DeepSpeed built here without its C++ ops (as ./launch.sh installs it),
# Ray unpacked and recompressed without its Java jars and RLlib (79 MB as a wheel, 32 MB so), and the SmolLM2
# tokenizer cache (no GGUF file travels). Left out: virtualenv and py-spy (Ray's runtime_env pip and the
# dashboard's profiler). About 62 MB; checked on 2026-12-04 in a Python 3.12 venv holding only the image's
# packages: `cora train --config configs/demo.yaml run.max_steps=2` trained to the end with PYTHONPATH=/tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CORA_VENV:-.venv}
out=.whl
pin() { grep -oE "\"$1(\[[a-z,]+\])?==[^\"]+\"" pyproject.toml | tr -d '"' | sed -E 's/\[[a-z,]+\]//'; }
carry=(transformers peft webdataset braceexpand hjson pydantic pydantic-core annotated-types typing-inspection
       typing-extensions jsonschema referencing rpds-py jsonschema-specifications aiohttp-cors colorful opencensus
       opencensus-context google-api-core googleapis-common-protos google-auth proto-plus pyasn1 pyasn1-modules
       cryptography cffi pycparser opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions
       opentelemetry-proto opentelemetry-exporter-prometheus smart-open tensorboardx xxhash)
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$out"
mkdir -p "$out"

echo "[bundle] resolving for CPython 3.12 ..." >&2
"$venv/bin/python" -m pip download -q "${platform[@]}" -d "$tmp/all" "ray[default,train]==$(pin ray | cut -d= -f3)" \
    "$(pin transformers)" "$(pin webdataset)" "$(pin peft)" "$(pin xxhash)" \
    pydantic hjson "typing-extensions>=4.16"
for f in "$tmp"/all/*.whl; do
    name=$(basename "$f" | cut -d- -f1 | tr '_A-Z' '-a-z')
    for c in "${carry[@]}"; do [[ "$name" == "$c" ]] && cp "$f" "$out/"; done
done

echo "[bundle] DeepSpeed without its C++ ops ..." >&2
"$venv/bin/python" -m pip download -q --no-deps --no-binary=:all: -d "$tmp/src" "$(pin deepspeed)"
DS_BUILD_OPS=0 "$venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$tmp"/src/deepspeed-*

echo "[bundle] Ray without jars/ and rllib/, xz ..." >&2
mkdir -p "$tmp/ray"
(cd "$tmp/ray" && unzip -q "$tmp"/all/ray-*.whl && tar cf - --exclude=./ray/jars --exclude=./ray/rllib . | xz -T0 -6) \
    >"$out/ray.tar.xz"

echo "[bundle] the SmolLM2 tokenizer cache ..." >&2
CORA_CACHE="$PWD/$out/cora-cache" "$venv/bin/python" -c "from cora.tokenizer import smollm2_tokenizer_dir as d; d()"

du -sh "$out" >&2
ls "$out" >&2
