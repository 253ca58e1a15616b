"""benchmarks/profile_step.py, run as a user runs it: the trainer's one-rank step timed and profiled, the modules
ZeRO-3 hooks counted (fewer with --leaf-layers, none under ZeRO stage 2), and stdout holding the JSON alone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_step.py"
pytestmark = pytest.mark.slow


def run(tokenizer, *extra: str) -> dict:     # the tokenizer fixture: its files cached before the child loads them
    out = subprocess.run([sys.executable, str(BENCH), "--json", "--shape", "tiny-llama", "--variants", "frozen,cora",
                          "--batch", "2", "--seq", "8", "--reps", "2", "--warmup", "1", "--profile-steps", "2",
                          "--top", "5", *extra], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_profile_step_times_profiles_and_counts_the_hooked_modules(tokenizer):
    per_module = run(tokenizer)
    per_layer = run(tokenizer, "--leaf-layers", "--partitioning", "replicated", "--zero-stage", "3", "--auto-sizes",
                    "--variants", "frozen,cora,cora_stage2")
    assert per_layer["leaf_layers"] is True and per_layer["partitioning"] == "replicated" and per_layer["auto_sizes"]
    assert per_module["auto_sizes"] is False
    assert per_module["zero_stage"] == per_layer["zero_stage"] == 3        # resolved as the trainer does
    for result in (per_module, per_layer):
        for name in ("frozen", "cora"):
            v = result["variants"][name]
            assert v["seconds"] > 0 and v["forward"] + v["backward"] + v["optimizer"] <= v["seconds"] + 1e-3
            p = v["profile"]
            assert p["wall_s"] > 0 and 0 < p["host_op_s"] and p["device_s"] == 0        # the CPU: no device time
            assert len(p["top"]) == 5 and all(t["calls"] > 0 for t in p["top"])
            assert p["kernel_launches"] == 0 and set(p["waits"].values()) == {0}
        # CoRA's generator and P add hooked modules to the frozen LLM's
        assert result["variants"]["cora"]["hooked_modules"] > result["variants"]["frozen"]["hooked_modules"]
    # a decoder layer hooked as one module: its ~15 submodules lose their hooks (tiny-llama: 2 layers)
    for name in ("frozen", "cora"):
        assert per_layer["variants"][name]["hooked_modules"] <= per_module["variants"][name]["hooked_modules"] - 20
    # the generator and P under ZeRO stage 2 (a replicated base's default): no module hooked at all
    stage2 = per_layer["variants"]["cora_stage2"]
    assert stage2["hooked_modules"] == 0 and stage2["seconds"] > 0 and per_layer["variants"]["cora"]["hooked_modules"] > 0
