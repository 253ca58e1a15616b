# Source it on a GPU machine, in the repository root, after .whl/ was carried there (benchmarks/gpu_bundle.sh
# made it): installs the bundle into /tmp/site and points PYTHONPATH and CORA_CACHE at it.
#
#   source benchmarks/gpu_install.sh && bash benchmarks/gpu.sh "$OUT/gpu"
#   source benchmarks/gpu_install.sh && python3 -m trainer.cli train --config configs/demo.yaml run.device=cuda ...
"${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || return 1
tar xJf .whl/ray.tar.xz -C /tmp/site || return 1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" CORA_CACHE="$PWD/.whl/cora-cache"
