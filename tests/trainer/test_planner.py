"""cora plan: the command line over cora.plan (a preset's shape, the generator counted)."""

import json

import pytest

from cora.plan import CPU, Setup, Shape, plan
from trainer.cli import main


def test_cora_plan_prints_the_plan_of_each_world_size(capsys):
    assert main(["plan", "--llm", "tiny-llama", "--workers", "1,2", "--seq-len", "100", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["setup"]["world"] for r in rows] == [1, 2] and rows[0]["params"] == 3_219_776
    # the demo generator (hidden 64, 2 layers) at d_model 64, r 16: 183,808 parameters in 29 modules
    s = rows[1]["setup"]
    assert (s["generator_params"], s["generator_head_params"], s["generator_modules"]) == (183_808, 66_560, 29)
    want = plan(Setup(**{**s, "shape": Shape(**s["shape"])}), CPU)
    assert rows[1]["memory_mib"]["peak"] == round(want.memory["peak"] / 2**20, 1)
    assert rows[1]["time_s"]["step"] == round(want.time["step"], 4)
    assert rows[1]["trainable_params"] == 183_808 + 2 * 16 * (64 + 32 + 32 + 64)


def test_cora_plan_says_what_was_wrong(capsys):
    assert main(["plan", "--llm", "tiny-llama", "--workers", "1,two"]) == 2
    assert "--workers '1,two' is not a comma-separated list of integers" in capsys.readouterr().err
    assert main(["plan", "--llm", "tiny-llama", "--micro-batch", "0"]) == 2
    assert "micro_batch must be >= 1, got 0" in capsys.readouterr().err
    assert main(["plan", "--llm", "/no/such/model"]) == 2
    assert "--llm '/no/such/model' is neither a preset" in capsys.readouterr().err
    assert main(["plan", "--llm", "tiny-gpt2"]) == 2                 # GPT-2's config has no intermediate_size
    assert "needs a Llama-style config" in capsys.readouterr().err


def test_cora_plan_auto_names_the_choice(capsys):
    assert main(["plan", "--llm", "llama-2-7b-shape", "--workers", "8", "--dtype", "bfloat16", "--hardware", "h100",
                 "--partitioning", "auto", "--activation-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "replicated" in out and "zero3 would take" in out
    # the 1.7B shape on this CPU: 1 rank fits without recomputing, 2 ranks (sharing 22 GiB) only with it
    assert main(["plan", "--llm", "smollm2-1.7b-shape", "--workers", "1,2", "--partitioning", "auto",
                 "--activation-checkpointing", "auto"]) == 0
    one, two = capsys.readouterr().out.splitlines()[-2:]
    assert "[replicated without activation checkpointing: " in one
    assert "[replicated with activation checkpointing: " in two and "without activation checkpointing does not fit" in two
    # 70B over 2 nodes of 8 GPUs: whole it fits nowhere, and hpz keeps the gathers of the base within a node
    assert main(["plan", "--llm", "llama-3-70b-shape", "--workers", "8,16", "--node-ranks", "8", "--dtype", "bfloat16",
                 "--hardware", "h100", "--partitioning", "auto", "--activation-checkpointing", "--json"]) == 0
    eight, sixteen = json.loads(capsys.readouterr().out)
    assert eight["setup"]["partitioning"] == "zero3" and "hpz would take" in eight["reason"]     # one node: a tie
    assert sixteen["setup"]["partitioning"] == "hpz" and sixteen["setup"]["node_ranks"] == 8
    assert "replicated does not fit" in sixteen["reason"]


def test_cora_train_resolves_auto_partitioning_before_the_workers_start():
    """engine.partitioning=auto becomes the planner's choice for the run's own setup (its LLM, workers, batch,
    prompt length, dtype), with the reason; a concrete choice is left alone."""
    from cora.config import from_dict
    from trainer.config import TrainConfig
    from trainer.planner import resolve_auto
    small = from_dict(TrainConfig, {"llm": {"name": "tiny-llama"}, "run": {"workers": 2},
                                    "engine": {"partitioning": "auto"}})
    line = resolve_auto(small, cf_dim=16)
    assert small.engine.partitioning == "replicated"            # whole on each rank, and no gathers: faster
    assert line.startswith("engine.partitioning=auto -> replicated (replicated: ") and "zero3 would take" in line
    # 70B in fp32 on this machine's profile (12 GiB per rank): nothing fits; zero3 needs the least
    big = from_dict(TrainConfig, {"llm": {"name": "llama-3-70b-shape"}, "run": {"workers": 2},
                                  "engine": {"partitioning": "auto"}})
    assert "nothing fits" in resolve_auto(big, cf_dim=16) and big.engine.partitioning == "zero3"
    fixed = from_dict(TrainConfig, {"llm": {"name": "tiny-llama"}, "engine": {"partitioning": "zero3"}})
    assert resolve_auto(fixed, cf_dim=16) == "" and fixed.engine.partitioning == "zero3"


def test_auto_activation_checkpointing_is_on_only_where_the_activations_do_not_fit_otherwise():
    """engine.activation_checkpointing=auto: off when the run fits without it (recomputing costs a forward), on
    when only recomputing makes it fit, with the reason; with a fixed partitioning only the checkpointing is
    chosen, and both are when both are auto."""
    from cora.config import from_dict
    from trainer.config import TrainConfig
    from trainer.planner import resolve_auto

    def cfg(llm, workers, **engine):
        return from_dict(TrainConfig, {"llm": {"name": llm}, "run": {"workers": workers}, "data": {"max_length": 512},
                                       "engine": {"activation_checkpointing": "auto", **engine}})
    small = cfg("tiny-llama", 2, partitioning="zero3")
    line = resolve_auto(small, cf_dim=16)
    assert small.engine.activation_checkpointing is False and small.engine.partitioning == "zero3"
    assert line.startswith("engine.activation_checkpointing=auto -> False (zero3 without activation checkpointing: ")
    assert "zero3 with activation checkpointing would take" in line and "replicated" not in line
    # the 1.7B shape on this machine's profile, 2 ranks: only recomputing fits (README: cora plan table)
    mid = cfg("smollm2-1.7b-shape", 2, partitioning="auto")
    line = resolve_auto(mid, cf_dim=16)
    assert mid.engine.activation_checkpointing is True, line
    assert "without activation checkpointing does not fit" in line
    assert line.startswith("engine.partitioning=auto -> replicated, engine.activation_checkpointing=auto -> True")
    big = cfg("llama-3-70b-shape", 2)
    line = resolve_auto(big, cf_dim=16)                    # nothing fits: the least memory, with recomputing
    assert "nothing fits" in line and big.engine.activation_checkpointing is True and "add ranks;" in line
    # cora scale's points plan the same way: a fixed partitioning, the checkpointing chosen, nothing left 'auto'
    from cora.plan import HARDWARE
    from trainer.planner import choose_for
    point = cfg("smollm2-1.7b-shape", 2)
    best, why = choose_for(point, "replicated", HARDWARE["cpu"], cf_dim=16)
    assert point.engine.partitioning == "replicated" and point.engine.activation_checkpointing is True
    assert best.fits and why.startswith("replicated with activation checkpointing: ") and "zero3" not in why


def test_scaling_efficiency_is_per_size_and_partitioning_weak_or_strong():
    from trainer.scale import COLUMNS, efficiency

    def row(size, part, w, sps, status="measured"):
        return {**dict.fromkeys(COLUMNS, ""), "size": size, "partitioning": part, "workers": w, "samples_per_s": sps,
                "status": status}
    rows = [row("a", "zero3", 1, 10.0), row("a", "zero3", 2, 15.0), row("a", "replicated", 1, 12.0),
            row("a", "replicated", 2, 18.0), row("a", "replicated", 4, 24.0), row("b", "zero3", 2, 4.0),
            row("b", "zero3", 4, 6.0), row("c", "zero3", 1, 0, status="does not fit: planned 9 GiB")]
    efficiency(rows, strong=False)
    # samples/s per worker against the smallest worker count of the same size and partitioning
    assert [r["weak_efficiency"] for r in rows] == [1.0, 0.75, 1.0, 0.75, 0.5, 1.0, 0.75, ""]
    assert all(r["strong_efficiency"] == "" for r in rows)
    efficiency(rows, strong=True)                 # engine.global_batch_size fixed: the same work, split
    assert [r["strong_efficiency"] for r in rows][:5] == [1.0, 0.75, 1.0, 0.75, 0.5]


def test_a_gpu_point_is_compared_with_its_device_memory_and_its_mfu_with_the_given_peak():
    """cora scale on a GPU: the planned peak against the ranks' peak allocated device memory (their resident
    sets hold the host's copies, not what the plan counts), MFU against --peak-tflops when given."""
    from cora.config import load
    from cora.plan import H100
    from trainer.config import TrainConfig
    from trainer.planner import shape_of
    from trainer.scale import COLUMNS, measured
    cfg = load(TrainConfig, ["configs/demo.yaml"], ["llm.name=smollm2-135m-shape", "run.workers=2",
                                                    "engine.partitioning=replicated"])
    log = [{"seconds": 0.5, "data_wait": 0.0, "padded_tokens": 800}] * 4
    ranks = [{"log": log, "memory": {"peak_rss_mib": 3000.0, "peak_cuda_mib": cuda}} for cuda in (1800.0, 1900.0)]

    def row():
        return {**dict.fromkeys(COLUMNS, ""), "size": "smollm2-135m-shape", "workers": 2, "micro_batch": 8,
                "global_batch": 16, "partitioning": "replicated"}
    gpu = measured(row(), cfg, ranks, H100, 16, warmup=1, flops=989e12)
    assert gpu["peak_rss_mib"] == 3000.0 and gpu["peak_cuda_mib"] == 1900.0
    assert gpu["memory_error"] == pytest.approx((gpu["planned_peak_mib"] - 1900.0) / 1900.0, abs=1e-4)
    n_mm = shape_of("smollm2-135m-shape").matmul_params
    # tokens/s = 2 ranks x 800 padded tokens / 0.5 s; MFU per rank against 989 TFLOP/s
    assert gpu["tokens_per_s"] == 3200.0
    assert gpu["mfu"] == pytest.approx(4 * n_mm * 3200 / (2 * 989e12), abs=1e-5)
    host = measured(row(), cfg, [{**r, "memory": {"peak_rss_mib": 3000.0}} for r in ranks], H100, 16, warmup=1,
                    flops=H100.flops)                         # a CPU run: no device memory, the resident set
    assert host["peak_cuda_mib"] == "" and host["memory_error"] == pytest.approx(
        (host["planned_peak_mib"] - 3000.0) / 3000.0, abs=1e-4)
    assert host["mfu"] == pytest.approx(gpu["mfu"] * 989e12 / H100.flops, abs=1e-5)


def test_cora_scale_plans_a_cuda_point_on_the_gpu_profile_and_takes_its_peak_for_the_mfu():
    """Without --hardware a point is planned on its run.device's profile (run.device=cuda: h100), and without
    --peak-tflops the MFU is against that profile's datasheet peak (the CPU has none: its measured rate)."""
    from argparse import Namespace

    from cora.config import load
    from cora.plan import CPU, H100
    from trainer.config import TrainConfig
    from trainer.scale import hardware, mfu_flops
    gpu = load(TrainConfig, ["configs/demo.yaml"], ["run.device=cuda", "engine.bf16=true"])
    cpu = load(TrainConfig, ["configs/demo.yaml"], [])
    default = Namespace(hardware=None, peak_tflops=None)
    assert hardware(default, gpu) is H100 and hardware(default, cpu) is CPU
    assert mfu_flops(default, H100) == 989e12 and mfu_flops(default, CPU) == CPU.flops
    assert hardware(Namespace(hardware="cpu", peak_tflops=None), gpu) is CPU          # --hardware wins
    assert mfu_flops(Namespace(hardware=None, peak_tflops=500.0), H100) == 500e12


def test_cora_scale_validates_each_point_with_its_own_partitioning(tmp_path, capsys):
    """engine.zero_stage=2 is valid for a replicated point even though the config's own partitioning is zero3
    (it used to be refused before any point ran); a point too large for the machine is planned, never started,
    and its row carries the stage it would have run."""
    import csv

    import numpy as np
    import pyarrow.parquet as pq

    from cora.cf.store import embedding_table
    from trainer.cli import main
    cf = tmp_path / "cf"
    cf.mkdir()
    pq.write_table(embedding_table("user", np.zeros((3, 16))), cf / "user_embeddings.parquet")
    (cf / "cf.json").write_text('{"config": {"model": "mf"}}')
    args = ["scale", "--config", "configs/demo.yaml", "--sizes", "llama-3-70b-shape", "--workers", "1",
            "--out", str(tmp_path / "report"), f"data.cf_dir={cf}", "engine.zero_stage=2"]
    assert main([*args, "--partitioning", "replicated"]) == 0
    row = next(csv.DictReader(open(tmp_path / "report" / "scaling.csv")))
    assert (row["partitioning"], row["zero_stage"]) == ("replicated", "2") and row["status"].startswith("does not fit")
    report = tmp_path / "report"          # nothing measured: the table and its reading, no empty plots (it crashed)
    assert "does not fit" in (report / "scaling.md").read_text() and not list(report.glob("*.png"))
    capsys.readouterr()
    assert main([*args, "--partitioning", "zero3", "--out", str(tmp_path / "other")]) == 2   # a real conflict
    assert "zero_stage 2 needs the frozen base whole on every rank" in capsys.readouterr().err
