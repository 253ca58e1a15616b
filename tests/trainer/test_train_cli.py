"""`cora train`: config validation, and a short end-to-end run through the command line."""

import glob
import json

import pytest

from cora.cli import main


def test_bad_config_reports_every_problem_before_starting_anything(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("run:\n  workers: 0\n  epohcs: 2\nengine:\n  micro_batch_size: 0\nllm:\n  name: tiny-llama\n")
    assert main(["train", "--config", str(cfg), "injection.rank=-1"]) == 2
    err = capsys.readouterr().err
    assert "4 problems" in err
    for text in ("epohcs", "did you mean 'epochs'", "run.workers must be >= 1, got 0",
                 "micro_batch_size must be >= 1, got 0", "rank must be a positive integer, got -1"):
        assert text in err


@pytest.mark.slow
def test_cora_train_end_to_end(tmp_path, capsys):
    data, cf, run = tmp_path / "data", tmp_path / "cf", tmp_path / "run"
    assert main(["prepare", "--source", "synthetic", "--out", str(data), "--users", "60", "--items", "40",
                 "--interactions", "800", "--samples-per-shard", "40", "--no-progress"]) == 0
    assert main(["train-cf", "--data", str(data), "--model", "mf", "--out", str(cf), "--dim", "16",
                 "--epochs", "3", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", "configs/demo.yaml", f"data.data_dir={data}", f"data.cf_dir={cf}",
                 f"run.run_dir={run}", "run.epochs=1", "run.max_steps=8"]) == 0
    out = capsys.readouterr().out                 # Ray forwards the workers' logs to stdout as well
    printed = json.loads(out[out.rindex("\n{\n") + 1:] if "\n{\n" in out else out)
    assert printed["steps"] == 8 and 0.0 <= printed["test"]["auc"] <= 1.0
    assert json.loads((run / "metrics.json").read_text())["test"] == printed["test"]
    assert (run / "export" / "adapter.safetensors").is_file() and (run / "test_predictions.parquet").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(glob.glob(str(run / "tensorboard" / "*"))[0])
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "valid/auc", "valid/uauc", "perf/samples_per_s",
            "perf/tokens_per_s", "time/data_wait_s", "time/forward_s", "time/backward_s", "time/optimizer_s",
            "time/embedding_lookup_s"} <= tags
    assert all(0 < e.value < 5 for e in ea.Scalars("time/embedding_lookup_s"))
    assert len(ea.Scalars("train/loss")) == 8
    # `cora eval`: the exported adapter in one process scores the test split as the run did
    assert main(["eval", "--run", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    evaluated = json.loads(out[out.rindex("\n{\n") + 1:] if "\n{\n" in out else out)
    assert evaluated["n"] == printed["test"]["n"]
    assert abs(evaluated["auc"] - printed["test"]["auc"]) < 1e-4 and abs(evaluated["uauc"] - printed["test"]["uauc"]) < 1e-4
    assert (run / "predictions-test.parquet").is_file()
