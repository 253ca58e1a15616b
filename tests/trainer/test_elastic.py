"""Elastic resume of `cora train` (ZeRO-3 on the CPU, local Ray): a run checkpointed mid-epoch by W workers
continues with W' != W; the epoch's samples not yet trained are re-planned over the W' ranks, so that the
sample log shows every train sample of the epoch trained exactly once, and the LR schedule is recomputed for
the steps the run really takes. The 1 -> 2 run keeps its whole run directory on moto's S3 server (each
training run costs a minute here, so that test also serves the run directory as a URI)."""

import json

import pyarrow.parquet as pq
import pytest

from cluster import runtime
from cora.fileio import open_fs
from cora.optim import OptimConfig, lr_at
from tests.conftest import TEST_CPUS
from trainer.cli import main

pytestmark = pytest.mark.slow


PREPARE = ("--users", "30", "--items", "20", "--interactions", "130", "--samples-per-shard", "6", "--rule", "additive",
           "--no-progress")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    runtime.init(num_cpus=TEST_CPUS)
    tmp = tmp_path_factory.mktemp("elastic")
    assert main(["prepare", "--source", "synthetic", "--out", str(tmp / "data"), *PREPARE]) == 0
    assert main(["train-cf", "--data", str(tmp / "data"), "--model", "mf", "--out", str(tmp / "cf"), "--dim", "8",
                 "--epochs", "2", "--no-progress"]) == 0
    return tmp


def args(inputs, run, workers, *extra):
    return ["train", "--config", "configs/demo.yaml", f"data.data_dir={inputs / 'data'}",
            f"data.cf_dir={inputs / 'cf'}", f"run.run_dir={run}", "run.epochs=1", "run.dashboard=false",
            "run.eval_baseline=false", "run.sample_log=true", "engine.micro_batch_size=4", "run.checkpoint_every=0",
            f"run.workers={workers}", "run.max_failures=0", *extra]


def records(run) -> list[dict]:
    """Every micro-batch record of every rank's sample log, each run's ranks in turn."""
    return [dict(json.loads(line), rank=int(f.stem[4:])) for f in sorted((run / "samples").glob("rank*.jsonl"))
            for line in f.read_text().splitlines()]


def download(uri: str, local):
    """A local copy of a run directory in object storage."""
    import pyarrow.fs as pafs
    fs, root = open_fs(uri)
    pafs.copy_files(root, str(local), source_filesystem=fs)
    return local


def elastic(inputs, run, before: int, after: int, cut: int, *extra, capsys) -> tuple[list[dict], dict, str]:
    """Train ``cut`` steps on ``before`` workers (a checkpoint mid-epoch), then the rest of the epoch on ``after``
    workers with run.resume=auto; asserts that the epoch's train samples were each trained exactly once.
    ``run``: a path, or a URI (read back through a local copy). Returns (the sample log's records, the
    resumed run's metrics, its stderr)."""
    assert main(args(inputs, run, before, f"run.max_steps={cut}", *extra)) == 0
    capsys.readouterr()
    assert main(args(inputs, run, after, "run.resume=auto", *extra)) == 0
    err = capsys.readouterr().err
    if isinstance(run, str):
        run = download(run, inputs / f"copy-{run.split('/')[-1]}")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from"] == f"step-{cut:09d}"
    recs = records(run)
    assert all(r["step"] <= cut for r in recs if r["rank"] >= after)      # the ranks W' lacks stopped at the cut
    assert {r["rank"] for r in recs if r["step"] <= cut} == set(range(before))
    trained = sorted(i for r in recs for i in r["sample_ids"])
    train_ids = sorted(pq.read_table(inputs / "data" / "train.parquet").column("sample_id").to_pylist())
    assert trained == train_ids                     # the whole epoch, each sample once: none skipped or repeated
    return recs, metrics, err


def schedule_is_followed(recs, total: int, cut: int) -> None:
    """The resumed steps train at the rates of a schedule of ``total`` steps, continued at step ``cut``."""
    demo = OptimConfig(warmup_steps=20, lr_peak=1e-3, lr_end=1e-4)
    resumed = {r["step"]: r["lr"] for r in recs if r["step"] > cut}
    assert sorted(resumed) == list(range(cut + 1, total + 1))
    for s, lr in resumed.items():
        assert lr == pytest.approx(lr_at(s - 1, total, demo), rel=1e-6), (s, lr, total)


def test_two_workers_resumed_on_one_keep_the_global_batch_and_train_each_sample_once(inputs, tmp_path, capsys):
    """2 -> 1 with engine.global_batch_size=8 (micro-batch 4): 1 micro-batch per step on 2 ranks, 2 after."""
    n = pq.read_metadata(inputs / "data" / "train.parquet").num_rows
    cut = 3
    recs, metrics, err = elastic(inputs, tmp_path / "run", 2, 1, cut, "engine.global_batch_size=8", capsys=capsys)
    assert "elastic resume from step-000000003 (saved by 2 workers) with run.workers=1" in err
    assert "engine.global_batch_size=8 is kept: accumulation 1 -> 2" in err
    after = [r for r in recs if r["step"] > cut]
    assert {r["micro"] for r in after} == {0, 1} and {r["rank"] for r in after} == {0}
    left = n - cut * 8                               # 8 samples per step before the cut (no padding yet)
    total = cut + -(-(-(-left // 4)) // 2)           # micro-batches of 4 on one rank, 2 per step
    assert metrics["steps"] == total
    schedule_is_followed(recs, total, cut)


def test_one_worker_resumed_on_two_replans_the_rest_over_both_ranks(inputs, s3_server, tmp_path, capsys):
    """1 -> 2 without a global batch: the global batch doubles (4 -> 8 samples per step), said on stderr. The
    data directory and the run directory are s3://runs/...: metrics.json, TensorBoard events, the sample logs (appended to by the
    resumed run), the export, predictions and checkpoints land there, the resume reads it, and `cora eval
    --run s3://...` scores the export as the run did."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from cora.fileio import read_parquet
    fs, _ = open_fs("s3://runs", create_buckets=True)
    fs.create_dir("runs")
    uri = f"s3://runs/{tmp_path.name}"
    # the data directory in the bucket too (the same preparation: the actors stream their shards from it)
    data = f"s3://runs/{tmp_path.name}-data"
    assert main(["prepare", "--source", "synthetic", "--out", data, *PREPARE]) == 0
    ids = read_parquet(f"{data}/train.parquet").column("sample_id").to_pylist()
    assert ids == pq.read_table(inputs / "data" / "train.parquet").column("sample_id").to_pylist()
    n = len(ids)
    cut = 4
    recs, metrics, err = elastic(inputs, uri, 1, 2, cut, f"data.data_dir={data}", capsys=capsys)
    assert "the global batch changes from 4 to 8 samples per step" in err
    after = [r for r in recs if r["step"] > cut]
    assert {r["rank"] for r in after} == {0, 1} and {r["micro"] for r in after} == {0}
    left = n - cut * 4
    total = cut + -(-(-(-left // 2)) // 4)           # ceil(ceil(left / 2) / 4) steps on two ranks
    assert metrics["steps"] == total
    schedule_is_followed(recs, total, cut)
    run = inputs / f"copy-{tmp_path.name}"
    for name in ("config.json", "export/adapter.safetensors", "export/config.json", "test_predictions.parquet"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == f"step-{total:09d}"
    board = EventAccumulator(str(run / "tensorboard")).Reload()      # both runs' event files
    assert sorted({e.step for e in board.Scalars("train/loss")}) == list(range(1, total + 1))
    capsys.readouterr()
    assert main(["eval", "--run", uri, "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert abs(again["auc"] - metrics["test"]["auc"]) < 1e-4
