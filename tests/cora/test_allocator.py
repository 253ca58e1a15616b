"""``cora.allocator.keep_freed_memory``: after it, a CoRA or LoRA training step stops faulting in fresh pages
for memory the previous step freed. Each side runs in a process of its own (the setting cannot be undone),
through benchmarks/allocator.py's child: the SmolLM2-135M shape at batch 2, 32 tokens."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks" / "allocator.py"


def faults(side: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, str(BENCH), "--child", side, "--reps", "2", "--batch", "2", "--seq", "32"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {k: v[1] for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.slow
def test_kept_memory_is_reused_by_the_next_step_without_page_faults():
    default, keep = faults("default"), faults("keep")
    # glibc as it comes: the adapters' steps give memory back and fault it in again (thousands of pages; how
    # many, and in which variant, depends on glibc's adaptive threshold's history)
    assert default["cora"] + default["lora"] > 2000, default
    assert keep["cora"] + keep["lora"] < (default["cora"] + default["lora"]) / 5, (keep, default)
    assert keep["frozen"] <= default["frozen"] + 100, (keep, default)
