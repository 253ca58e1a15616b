"""Shape presets built partitioned under ZeRO-3 (2 rank processes): no rank above its share, the same
weights as a single process's build."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cora.llm import LLMConfig, load_llm, shape_parameters

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_ranks_build_a_shape_partitioned_each_within_its_share():
    """benchmarks/build_shape.py: 2 rank processes (gloo) build smollm2-135m-shape under ZeRO-3; each
    rank's memory growth stays within its half of the model plus 5% and 100 MiB (transformers' model
    modules imported on first use, Python objects), and its slice of every parameter is bit-identical
    to the same elements of a one-process build."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "build_shape.py"), "--json", "--hashes",
                          "--llm", "smollm2-135m-shape", "--world", "2"], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=800)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    share = report["full_mib"] / 2
    assert report["params"] == 134_515_008
    for rank in report["ranks"]:
        assert abs(rank["held_mib"] - share) < 1, rank
        assert rank["build_mib"] <= share * 1.05 + 100, rank
    whole, _ = load_llm(LLMConfig(name="smollm2-135m-shape"))
    for name, p, _ in shape_parameters(whole):
        flat, part = p.data.view(-1), -(-p.numel() // 2)            # DeepSpeed: ceil(numel / world) each
        for r, rank in enumerate(report["ranks"]):
            piece = flat[r * part:(r + 1) * part].contiguous()
            assert hashlib.sha256(piece.view(torch.uint8).numpy().tobytes()).hexdigest() == rank["hashes"][name], \
                (name, r)
