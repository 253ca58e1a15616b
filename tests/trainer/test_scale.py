"""cora scale end to end on the CPU: two real (size, workers) points trained and measured, two that the
planner says do not fit reported without being run, two that fail at their start written down as failed
while the study goes on, and the report's three artefacts."""

import csv
import json

import pytest

from cluster import runtime
from cora.llm import build_config, load_tokenizer
from tests.conftest import TEST_CPUS
from trainer.cli import main

pytestmark = pytest.mark.slow


def test_cora_scale_two_points_two_that_do_not_fit_and_two_that_fail(tmp_path, capsys):
    data, cf, out = tmp_path / "data", tmp_path / "cf", tmp_path / "report"
    broken = tmp_path / "broken-llm"              # a model directory with a config.json and nothing else
    broken.mkdir()
    (broken / "config.json").write_text(build_config("tiny-llama", load_tokenizer("tiny-llama")).to_json_string())
    assert main(["prepare", "--source", "synthetic", "--out", str(data), "--users", "60", "--items", "40",
                 "--interactions", "800", "--samples-per-shard", "40", "--no-progress"]) == 0
    assert main(["train-cf", "--data", str(data), "--model", "mf", "--out", str(cf), "--dim", "16",
                 "--epochs", "2", "--no-progress"]) == 0
    capsys.readouterr()
    runtime.init(num_cpus=TEST_CPUS)
    # the broken directory's points fail at their start: written down as failed, the study goes on, exit 1
    assert main(["scale", "--config", "configs/demo.yaml", "--sizes", f"tiny-llama,{broken},llama-3-70b-shape",
                 "--workers", "1,2", "--steps", "6", "--warmup", "2", "--out", str(out),
                 f"data.data_dir={data}", f"data.cf_dir={cf}", "run.epochs=1"]) == 1
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert f"2 point(s) failed: {broken} x 1" in captured.err
    rows = list(csv.DictReader(open(out / "scaling.csv")))
    failed = [rows.pop(2), rows.pop(2)]
    for r, w in zip(failed, ("1", "2")):
        assert (r["size"], r["workers"], r["step_s"]) == (str(broken), w, "")
        assert r["status"].startswith("failed: ConfigError:") and "no *.safetensors weights" in r["status"]
    assert [(r["size"], r["workers"]) for r in rows] == [("tiny-llama", "1"), ("tiny-llama", "2"),
                                                         ("llama-3-70b-shape", "1"), ("llama-3-70b-shape", "2")]
    assert printed["rows"][0]["size"] == "tiny-llama" and len(printed["rows"]) == 6
    for r in rows[:2]:
        assert r["status"] == "measured"
        step, w = float(r["step_s"]), int(r["workers"])
        assert float(r["samples_per_s"]) == pytest.approx(w * 8 / step, rel=1e-2)
        assert 300 < float(r["peak_rss_mib"]) < 4000 and float(r["planned_peak_mib"]) > 0
        # step_s and planned_step_s are rounded to 0.1 ms: on a fast step (~40 ms) that moves the ratio by ~0.3%
        assert float(r["step_error"]) == pytest.approx((float(r["planned_step_s"]) - step) / step, rel=1e-2, abs=3e-3)
        assert float(r["memory_error"]) == pytest.approx(
            (float(r["planned_peak_mib"]) - float(r["peak_rss_mib"])) / float(r["peak_rss_mib"]), abs=1e-3)
        assert int(r["params"]) == 3_219_776 and 0 < float(r["mfu"]) < 1
    assert rows[0]["weak_efficiency"] == "1.0" and float(rows[1]["weak_efficiency"]) > 0
    assert rows[0]["strong_efficiency"] == ""                # the micro-batch per rank was fixed: weak scaling
    for r in rows[:2]:                 # --partitioning auto (the default): the planner's choice, with its reason
        assert r["partitioning"] == "replicated" and "zero3 would take" in r["choice"]
        assert r["zero_stage"] == "2"          # as the ranks reported it: the generator and P under ZeRO stage 2
    for r in rows[2:]:       # the option needing least memory: at 2 workers zero3 (half the base each); at 1 it
        # partitions nothing and its hooks raise the activations' peak (cora.plan.CPU.stage3_activation_factor)
        assert r["partitioning"] == ("zero3" if r["workers"] == "2" else "replicated"), r
        assert r["choice"].startswith("nothing fits")
    for r in rows[2:]:                                 # 70B in fp32 on this machine: planned, never started
        assert r["status"].startswith("does not fit: planned") and r["step_s"] == ""
        assert not (out / "runs" / f"llama-3-70b-shape-w{r['workers']}").exists()
    md = (out / "scaling.md").read_text()
    assert "| tiny-llama | 3219776 | 1 |" in md and "## Reading" in md and "does not fit" in md
    assert f"- {broken} x 2: failed: ConfigError:" in md
    assert "the planner chose replicated" in md
    for png in ("throughput_memory.png", "efficiency.png", "planned_vs_measured.png"):
        head = (out / png).read_bytes()
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) > 5000, png
