"""`cora train`: config validation, and a short end-to-end run through the command line."""

import glob
import json

import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from cluster import runtime
from trainer.cli import main
from tests.conftest import TEST_CPUS


def test_bad_config_reports_every_problem_before_starting_anything(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("run:\n  workers: 0\n  epohcs: 2\nengine:\n  micro_batch_size: 0\nllm:\n  name: tiny-llama\n")
    assert main(["train", "--config", str(cfg), "injection.rank=-1"]) == 2
    err = capsys.readouterr().err
    assert "4 problems" in err
    for text in ("epohcs", "did you mean 'epochs'", "run.workers must be >= 1, got 0",
                 "micro_batch_size must be >= 1, got 0", "rank must be a positive integer, got -1"):
        assert text in err


def test_bad_inputs_are_all_reported_before_ray_or_a_worker_starts(tmp_path, capsys):
    data, model, run = tmp_path / "data", tmp_path / "model", tmp_path / "run"
    assert main(["prepare", "--source", "synthetic", "--out", str(data), "--users", "30", "--items", "20",
                 "--interactions", "300", "--no-progress"]) == 0
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))     # no weights, no tokenizer
    run.mkdir()
    (run / "config.json").write_text("{}")                                      # an earlier run lives here
    capsys.readouterr()
    assert main(["train", "--config", "configs/demo.yaml", f"data.data_dir={data}", f"data.cf_dir={tmp_path / 'nocf'}",
                 f"run.run_dir={run}", f"llm.name={model}", "engine.micro_batch_size=3",
                 "engine.global_batch_size=8"]) == 2
    err = capsys.readouterr().err
    assert "5 problems" in err, err
    for text in ("fewer shard files than run.workers=2 ranks in split(s) train (1), valid (1), test (1), so a rank "
                 "would own none; prepare it again with --samples-per-shard <= 15 (now ", f"no *.safetensors weights in {model}", f"no tokenizer (tokenizer.json, tokenizer.model or vocab.json) "
                 f"in {model}", f"{tmp_path / 'nocf'} lacks cf.json, user_embeddings.parquet, item_embeddings.parquet",
                 "engine.global_batch_size=8 is not a multiple of engine.micro_batch_size x run.workers = 3 x 2 = 6",
                 "choose a global batch of 6 or 12", f"{run} already holds a run (config.json)", "run.overwrite=true"):
        assert text in err, text
    # a target module the model family lacks, and data that was never prepared
    assert main(["train", "--config", "configs/demo.yaml", f"data.data_dir={tmp_path / 'nodata'}",
                 f"run.run_dir={tmp_path / 'run2'}", "llm.name=tiny-gpt2", "injection.targets=[q_proj]"]) == 2
    err = capsys.readouterr().err
    assert "GPT-2 fuses q, k and v" in err and "is not a prepared data directory (no dataset.json)" in err
    assert not (tmp_path / "run2").exists() and sorted(p.name for p in run.iterdir()) == ["config.json"]
    # the earlier stages of CoLLM and RecCocktail: missing, or trained with another rank
    from tests.conftest import write_tallrec_export
    write_tallrec_export(tmp_path / "r8", rank=8)
    assert main(["train", "--config", "configs/demo.yaml", f"data.data_dir={data}", f"run.run_dir={tmp_path / 'run3'}",
                 "method=reccocktail", f"reccocktail.base_from={tmp_path / 'r8'}",
                 f"reccocktail.ingredient_from={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert f"reccocktail.base_from='{tmp_path / 'r8'}' was trained with injection.rank 8 (this run: 16)" in err, err
    assert f"reccocktail.ingredient_from='{tmp_path / 'none'}' lacks config.json, adapter.safetensors" in err
    assert main(["train", "--config", "configs/demo.yaml", f"data.data_dir={data}", f"run.run_dir={tmp_path / 'run3'}",
                 "method=collm", f"collm.lora_from={tmp_path / 'none'}"]) == 2
    assert f"collm.lora_from='{tmp_path / 'none'}' lacks config.json" in capsys.readouterr().err
    assert not (tmp_path / "run3").exists()


def test_a_cf_run_of_other_data_is_refused_and_one_of_the_same_preparation_accepted(tmp_path, capsys):
    """data.cf_dir must have been trained on data.data_dir: its rows are that data's users and items. The same
    preparation written again elsewhere (same inputs and options: same fingerprint) is the same data."""
    prep = ["prepare", "--source", "synthetic", "--users", "30", "--items", "20", "--interactions", "300",
            "--samples-per-shard", "10", "--no-progress"]
    assert main([*prep, "--out", str(tmp_path / "a")]) == 0
    assert main([*prep, "--out", str(tmp_path / "again")]) == 0
    assert main([*prep, "--out", str(tmp_path / "b"), "--seed", "1"]) == 0
    assert main(["train-cf", "--data", str(tmp_path / "a"), "--out", str(tmp_path / "cf"), "--dim", "8", "--epochs", "1",
                 "--no-progress"]) == 0
    capsys.readouterr()
    train = ["train", "--config", "configs/demo.yaml", f"data.cf_dir={tmp_path / 'cf'}", "run.dashboard=false"]
    assert main([*train, f"data.data_dir={tmp_path / 'b'}", f"run.run_dir={tmp_path / 'run'}", "engine.global_batch_size=7"]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "engine.global_batch_size=7" in err, err
    assert f"data.cf_dir: {tmp_path / 'cf'} was trained on {(tmp_path / 'a').resolve()}" in err, err
    assert f"not on {tmp_path / 'b'}" in err and f"cora train-cf --data {tmp_path / 'b'}" in err
    manifest = json.loads((tmp_path / "again" / "dataset.json").read_text())     # written by another version:
    (tmp_path / "again" / "dataset.json").write_text(json.dumps({**manifest, "note": "x"}))  # other bytes, same data
    for ok in ("a", "again"):                 # only the global batch's problem is left
        assert main([*train, f"data.data_dir={tmp_path / ok}", f"run.run_dir={tmp_path / 'run'}", "engine.global_batch_size=7"]) == 2
        err = capsys.readouterr().err
        assert "1 problem" in err and "was trained on" not in err, (ok, err)
    assert not (tmp_path / "run").exists()


def test_bad_bdlm_settings_are_reported_with_the_value_and_the_fix(tmp_path, capsys):
    assert main(["train", "--config", "configs/demo.yaml", "method=bdlm", "bdlm.store_lr=0", "bdlm.domain_epochs=-1",
                 "bdlm.mutual_weight=-0.5"]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err, err
    for text in ("store_lr must be > 0, got 0", "domain_epochs must be >= 0 (0 turns it off), got -1",
                 "mutual_weight must be >= 0 (0 turns it off), got -0.5"):
        assert text in err, text
    assert main(["train", "--config", "configs/demo.yaml", "method=bdlm", "bdlm.store_optimizer=adagrad"]) == 2
    assert "bdlm.store_optimizer: 'adagrad' is not one of the allowed values: 'adam', 'sgd'" in capsys.readouterr().err
    data = tmp_path / "data"
    assert main(["prepare", "--source", "synthetic", "--out", str(data), "--users", "30", "--items", "20",
                 "--interactions", "300", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", "configs/demo.yaml", f"data.data_dir={data}", f"run.run_dir={tmp_path / 'run'}",
                 "method=bdlm", "bdlm.store_shards=25"]) == 2
    err = capsys.readouterr().err
    assert f"bdlm.store_shards=25: the store cuts each table into that many id ranges, but {data} has only 20 items; " \
           f"use bdlm.store_shards <= 20" in err, err
    assert not (tmp_path / "run").exists()


def test_a_cuda_run_without_gpus_and_a_join_without_a_token_are_refused_before_ray_starts(tmp_path, capsys,
                                                                                         monkeypatch):
    import ray
    import torch
    data = tmp_path / "data"
    assert main(["prepare", "--source", "synthetic", "--out", str(data), "--users", "30", "--items", "20",
                 "--interactions", "300", "--no-progress"]) == 0
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))                  # no ~/.ray/auth_token
    was_up = ray.is_initialized()
    capsys.readouterr()
    common = ["train", "--config", "configs/demo.yaml", f"data.data_dir={data}", f"run.run_dir={tmp_path / 'run'}"]
    assert main(common + ["run.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert not torch.cuda.is_available()                                # this machine, and CI's, have no GPU
    assert "run.device=cuda with run.workers=2 needs 2 GPU(s) on this machine, but torch.cuda.is_available() " \
           "is False" in err and "use run.device=cpu" in err
    assert main(common + ["run.address=10.1.2.3:6379"]) == 2
    err = capsys.readouterr().err
    assert "joining the Ray cluster at '10.1.2.3:6379' without token authentication is refused" in err
    assert "RAY_AUTH_TOKEN" in err and "ray get-auth-token" in err
    assert ray.is_initialized() == was_up and not (tmp_path / "run").exists()
    # a token file named by RAY_AUTH_TOKEN_PATH must exist; one that does, or RAY_AUTH_TOKEN, is accepted
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert "names no readable, non-empty file" in runtime.check_join("auto")[0]
    (tmp_path / "token").write_text("0123abcd")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert runtime.check_join("10.1.2.3:6379") == [] and runtime.check_join(None) == []
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0123abcd")
    assert runtime.check_join("10.1.2.3:6379") == []


@pytest.mark.slow
def test_cora_train_end_to_end(tmp_path, capsys):
    data, cf, run = tmp_path / "data", tmp_path / "cf", tmp_path / "run"
    assert main(["prepare", "--source", "synthetic", "--out", str(data), "--users", "60", "--items", "40",
                 "--interactions", "800", "--samples-per-shard", "40", "--rank-negatives", "5", "--no-progress"]) == 0
    assert main(["train-cf", "--data", str(data), "--model", "mf", "--out", str(cf), "--dim", "16",
                 "--epochs", "3", "--no-progress"]) == 0
    capsys.readouterr()
    runtime.init(num_cpus=TEST_CPUS)          # one Ray instance for the whole test session
    assert main(["train", "--config", "configs/demo.yaml", f"data.data_dir={data}", f"data.cf_dir={cf}",
                 f"run.run_dir={run}", "run.epochs=1", "run.max_steps=8", "data.bucket_window=4",
                 "data.pad_multiple=8"]) == 0
    printed = json.loads(capsys.readouterr().out)      # stdout holds only the result (logs go to stderr)
    assert printed["steps"] == 8 and printed["no_injection_test"]["n"] == printed["test"]["n"]
    # the printed AUC is the one of the predictions the run wrote, recomputed independently
    preds = pq.read_table(run / "test_predictions.parquet").to_pandas()
    test = pq.read_table(data / "test.parquet").to_pandas().set_index("sample_id")
    assert sorted(preds["sample_ids"]) == sorted(test.index)
    assert (preds["labels"].to_numpy() == test.loc[preds["sample_ids"], "label"].to_numpy()).all()
    assert abs(roc_auc_score(preds["labels"], preds["scores"]) - printed["test"]["auc"]) < 1e-9
    assert (run / "export" / "adapter.safetensors").is_file()
    # the rank split (each test positive among 5 recorded negatives), scored on both ranks and gathered
    from cora.metrics import ranking
    queries = pq.read_table(data / "rank.parquet").column("query").to_numpy()
    ranked = pq.read_table(run / "rank_predictions.parquet").to_pandas()
    assert sorted(ranked["queries"]) == sorted(queries) and printed["ranking"]["n_queries"] == len(set(queries))
    again = ranking(ranked["queries"], ranked["labels"], ranked["scores"], users=ranked["users"])
    assert {k: printed["ranking"][k] for k in again} == again and 0 < printed["ranking"]["mrr"] <= 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(glob.glob(str(run / "tensorboard" / "*"))[0])
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "valid/auc", "valid/uauc", "perf/samples_per_s",
            "perf/tokens_per_s", "time/data_wait_s", "time/forward_s", "time/backward_s", "time/optimizer_s",
            "time/embedding_lookup_s"} <= tags
    assert all(0 < e.value < 5 for e in ea.Scalars("time/embedding_lookup_s"))
    assert len(ea.Scalars("train/loss")) == 8
    # rank 0's padding: per step on TensorBoard, summed in metrics.json
    real, padded = ([e.value for e in ea.Scalars(f"data/{k}_tokens")] for k in ("real", "padded"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tokens"] == sum(real) > 0 and metrics["padded_tokens"] == sum(padded)
    assert metrics["padding_share"] == round(sum(padded) / (sum(real) + sum(padded)), 4)
    assert [round(e.value, 5) for e in ea.Scalars("data/padding_share")] == [
        round(p / (p + r), 5) for r, p in zip(real, padded)]
    assert all((r + p) % 64 == 0 for r, p in zip(real, padded))         # 8 rows x T, T rounded up to 8
    # `cora eval`: the exported adapter in one process scores the test split as the run did
    assert main(["eval", "--run", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    evaluated = json.loads(out[out.rindex("\n{\n") + 1:] if "\n{\n" in out else out)
    assert evaluated["n"] == printed["test"]["n"]
    assert abs(evaluated["auc"] - printed["test"]["auc"]) < 1e-4 and abs(evaluated["uauc"] - printed["test"]["uauc"]) < 1e-4
    assert (run / "predictions-test.parquet").is_file()
    assert main(["eval", "--run", str(run), "--split", "rank", "--no-progress"]) == 0
    out = capsys.readouterr().out
    one = json.loads(out[out.rindex("\n{\n") + 1:] if "\n{\n" in out else out)["ranking"]
    assert one["n_queries"] == printed["ranking"]["n_queries"]
    assert abs(one["mrr"] - printed["ranking"]["mrr"]) <= 1 / one["n_queries"]     # one order flip at most
    # the best committed checkpoint holds the same generator and P as the export: the same scores
    assert main(["eval", "--run", str(run), "--checkpoint", "best", "--no-progress"]) == 0
    out = capsys.readouterr().out
    from_ckpt = json.loads(out[out.rindex("\n{\n") + 1:] if "\n{\n" in out else out)
    assert from_ckpt["source"].startswith("checkpoint step-") and from_ckpt["auc"] == evaluated["auc"]
    [written] = glob.glob(str(run / "predictions-test-step-*.parquet"))
    assert (pq.read_table(written).column("score").to_numpy()
            == pq.read_table(run / "predictions-test.parquet").column("score").to_numpy()).all()


@pytest.mark.slow
def test_laser_trains_on_two_ranks_whatever_empty_histories_their_batches_hold(tmp_path):
    """method=laser with the demo's M-Former on sequential data, where a fifth of the train rows have no
    history: in the first steps one rank's batch holds such a row while the other's does not. A router
    that branched on empty histories made the ranks' ZeRO-3 collectives mismatch at the first step (gloo
    aborted, `cora train` exited 1); the routing is now one computation for every batch."""
    from tests.trainer.runs import final
    data, cf, run = tmp_path / "data", tmp_path / "cf", tmp_path / "run"
    assert main(["prepare", "--source", "synthetic", "--out", str(data), "--users", "60", "--items", "40",
                 "--interactions", "700", "--samples-per-shard", "50", "--rule", "sequential", "--window", "5",
                 "--no-progress"]) == 0
    assert main(["train-cf", "--data", str(data), "--model", "mf", "--out", str(cf), "--dim", "16", "--epochs", "3",
                 "--min-epochs", "1", "--no-progress"]) == 0
    runtime.init(num_cpus=TEST_CPUS)
    assert main(["train", "--config", "configs/demo.yaml", f"data.data_dir={data}", f"data.cf_dir={cf}",
                 f"run.run_dir={run}", "method=laser", "run.epochs=1", "run.max_steps=3", "run.eval_baseline=false",
                 "engine.micro_batch_size=4", "run.sample_log=true", "run.dashboard=false",
                 "data.bucket_window=0"]) == 0      # bucketing gives both ranks their short (empty-history) rows together
    assert json.loads((run / "metrics.json").read_text())["steps"] == 3
    train = pq.read_table(data / "train.parquet").to_pandas().set_index("sample_id")
    empty = {s for s, h in train["history"].items() if len(h) == 0}
    records = final(run)
    held = {(step, rank): any(i in empty for i in rec["sample_ids"]) for (step, rank, _), rec in records.items()}
    assert any(held[(s, 0)] != held[(s, 1)] for s in (1, 2, 3)), held     # the case that used to abort
