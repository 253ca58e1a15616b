"""benchmarks/calibrate.py --fit inverts the planner: on a cora scale report whose steps and memory are what a
known machine profile plans, it returns that profile's constants."""

import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cora.cf.store import embedding_table
from cora.plan import CPU, memory, plan
from trainer.planner import setup_for

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import calibrate  # noqa: E402

SMALL, LARGE = "tiny-llama", "smollm2-135m-shape"
GEN = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}
# a machine unlike this one's profile in every fitted constant
TRUTH = dataclasses.replace(CPU, bandwidth=3.1e8, latency=9e-5, element_s=4e-9, step_overhead_s=0.02, module_overhead_s=2e-4, copy_bandwidth=3e9,
                            busy_slowdown=1.25, sync_overhead_s=0.011, runtime_bytes=6e8, comm_bytes=2e7,
                            activation_factor=1.3, stage3_activation_factor=1.9, gathered_factor=2.4)
POINTS = [(k, w, p) for k in (SMALL, LARGE) for w in (1, 2) for p in ("zero3", "replicated")]


def write_report(out: Path, seq: int = 96, longest: int = 140) -> None:
    """scaling.csv, the runs' config and the ranks' reports of the points, measured as TRUTH plans them."""
    cf = out / "cf"
    cf.mkdir(parents=True)
    pq.write_table(embedding_table("user", np.zeros((3, 16))), cf / "user_embeddings.parquet")
    (cf / "cf.json").write_text(json.dumps({"config": {"model": "mf"}}))
    config = {"generator": GEN, "data": {"cf_dir": str(cf)}, "llm": {"dtype": "float32"},
              "injection": {"rank": 16}, "engine": {"activation_checkpointing": False, "persistence_threshold": 0}}
    run = out / "runs" / f"{LARGE}-w1-zero3"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    rows = []
    for size, w, part in POINTS:
        stage = 2 if part == "replicated" else 3
        s = setup_for(size, w, 8, seq, "float32", False, part, GEN, 16, 16, 0, zero_stage=stage)
        at_longest = setup_for(size, w, 8, longest, "float32", False, part, GEN, 16, 16, 0, zero_stage=stage)
        peak, parts = plan(at_longest, TRUTH).memory["peak"], memory(at_longest, TRUTH)
        rows.append({"size": size, "workers": w, "partitioning": part, "status": "measured", "micro_batch": 8,
                     "global_batch": 8 * w, "seq_len": seq, "zero_stage": stage,
                     "step_s": repr(plan(s, TRUTH).time["step"])})
        ranks = out / "ranks" / f"{size}-w{w}-{part}"
        ranks.mkdir(parents=True)
        for r in range(w):                    # the resident set after set-up: the process, the base, the state
            setup_rss = parts["runtime"] + parts["comm"] + parts["frozen"] + parts["trainable"]
            (ranks / f"rank{r}.json").write_text(json.dumps({
                "log": [{"padded_tokens": seq * 8}, {"padded_tokens": longest * 8}],
                "setup_memory": {"rss_mib": setup_rss / 2**20}, "memory": {"peak_rss_mib": peak / 2**20}}))
    with open(out / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_the_fit_returns_the_constants_of_the_machine_that_ran_the_report(tmp_path):
    write_report(tmp_path)
    got = calibrate.fit(str(tmp_path), LARGE, SMALL, TRUTH.flops, CPU.latency)     # the latency: a start
    want = {k: getattr(TRUTH, k) for k in ("latency", "element_s", "step_overhead_s", "module_overhead_s", "copy_bandwidth",
                                           "busy_slowdown", "sync_overhead_s", "bandwidth", "runtime_bytes",
                                           "activation_factor", "stage3_activation_factor", "comm_bytes",
                                           "gathered_factor")}
    assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-6)


def test_the_fit_names_the_points_a_report_lacks(tmp_path):
    write_report(tmp_path)
    with open(tmp_path / "scaling.csv") as f:
        rows = [r for r in csv.DictReader(f) if (r["size"], r["workers"], r["partitioning"]) != (SMALL, "1", "zero3")]
    with open(tmp_path / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(SystemExit, match=r"lacks the measured points \[\('tiny-llama', 1, 'zero3'\)\]"):
        calibrate.fit(str(tmp_path), LARGE, SMALL, TRUTH.flops, TRUTH.latency)
