"""Exact resume and fault tolerance of `cora train` (2 ZeRO-3 ranks on the CPU, local Ray): a run whose
worker is killed mid-epoch resumes from its newest committed checkpoint (on moto's S3 server) and
trains on exactly the samples, with exactly the losses, of an uninterrupted run."""

import json
import os
import signal
import threading
import time

import psutil
import pytest

from cluster import runtime
from trainer.cli import main
from tests.conftest import TEST_CPUS
from cora.fileio import open_fs
from trainer.checkpoint import list_checkpoints, read_commit, CheckpointError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    runtime.init(num_cpus=TEST_CPUS)
    tmp = tmp_path_factory.mktemp("resume")
    assert main(["prepare", "--source", "synthetic", "--out", str(tmp / "data"), "--users", "60", "--items", "40",
                 "--interactions", "700", "--samples-per-shard", "50", "--rule", "additive", "--no-progress"]) == 0
    assert main(["train-cf", "--data", str(tmp / "data"), "--model", "mf", "--out", str(tmp / "cf"), "--dim", "8",
                 "--epochs", "3", "--no-progress"]) == 0
    return tmp


def args(inputs, run, *extra):
    return ["train", "--config", "configs/demo.yaml", f"data.data_dir={inputs / 'data'}",
            f"data.cf_dir={inputs / 'cf'}", f"run.run_dir={run}", "run.epochs=1", "run.dashboard=false",
            "run.eval_baseline=false", "run.sample_log=true", "engine.micro_batch_size=4", "run.checkpoint_every=4",
            *extra]


def steps(run) -> dict[int, list[dict]]:
    """Every record of the sample logs, per step (several when a step was trained again after a restart)."""
    out: dict[int, list[dict]] = {}
    for r in (0, 1):
        for line in (run / "samples" / f"rank{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], []).append(dict(rec, rank=r))
    return out


def final(run) -> dict[int, dict]:
    """Per step and rank, the last record: what the finished run's state was trained on."""
    out = {}
    for step, recs in steps(run).items():
        for rec in recs:
            out[(step, rec["rank"])] = rec
    return out


def ours(proc: psutil.Process) -> bool:
    """A process of this test session's Ray instance (whose raylet is a child of this process), not of
    another session running on the same machine."""
    try:
        return any(parent.pid == os.getpid() for parent in proc.parents())
    except psutil.NoSuchProcess:
        return False


class Killer:
    """Kills one Ray Train worker process (SIGKILL) once a checkpoint at or after ``after_step`` is committed."""

    def __init__(self, uri: str, after_step: int):
        self.uri, self.after, self.killed_at = uri, after_step, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        deadline = time.time() + 600
        while time.time() < deadline and self.killed_at is None:
            committed = []
            try:
                for n in list_checkpoints(self.uri):
                    try:
                        committed.append(read_commit(self.uri, n)["step"])
                    except CheckpointError:
                        pass
            except OSError:
                pass
            if committed and max(committed) >= self.after:
                workers = [p for p in psutil.process_iter(["cmdline"])
                           if any("RayTrainWorker" in c for c in (p.info["cmdline"] or [])) and ours(p)]
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    self.killed_at = max(committed)
                    return
            time.sleep(0.05)


def test_killed_then_resumed_from_s3_equals_an_uninterrupted_run(inputs, tmp_path, s3_server, capsys):
    fs, _ = open_fs("s3://ckpts", create_buckets=True)
    fs.create_dir("ckpts")
    budget = "run.max_steps=24"
    ref = tmp_path / "reference"
    assert main(args(inputs, ref, budget)) == 0
    run, uri = tmp_path / "run", "s3://ckpts/run"
    killer = Killer(uri, after_step=8)
    capsys.readouterr()
    # max_failures=0: the killed run fails ...
    assert main(args(inputs, run, budget, f"run.checkpoint_uri={uri}", "run.max_failures=0")) == 1
    err = capsys.readouterr().err
    assert "the worker group failed (run.max_failures=0" in err and f"checkpoints stay in {uri}" in err
    assert "run.resume=auto" in err
    assert killer.killed_at is not None
    interrupted = steps(run)
    assert max(interrupted) < 24                   # ... mid-epoch (an epoch has 100 steps), before its budget
    assert main(args(inputs, run, budget, f"run.checkpoint_uri={uri}", "run.resume=auto")) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    resumed = int(metrics["resumed_from"].split("-")[1])
    assert 8 <= resumed < 24 and metrics["steps"] == 24
    want, got = final(ref), final(run)
    assert sorted(got) == sorted(want)             # the same steps on both ranks, none skipped
    for key in want:                               # the same samples, in the same order, with the same loss
        assert got[key]["sample_ids"] == want[key]["sample_ids"], key
        assert abs(got[key]["loss"] - want[key]["loss"]) < 1e-5, (key, got[key]["loss"], want[key]["loss"])
    # the steps after the checkpoint that the killed run had trained were trained again, once
    redone = [s for s, recs in steps(run).items() if len(recs) > 2]
    assert all(s > resumed for s in redone)


def test_a_killed_worker_is_restarted_by_ray_train_from_the_last_checkpoint(inputs, tmp_path):
    run = tmp_path / "run"
    killer = Killer(str(run / "checkpoints"), after_step=8)
    assert main(args(inputs, run, "run.max_failures=1", "run.checkpoint_every=3")) == 0
    assert killer.killed_at is not None
    metrics = json.loads((run / "metrics.json").read_text())
    resumed = int(metrics["resumed_from"].split("-")[1])
    assert resumed >= 8
    import pyarrow.parquet as pq
    train_ids = pq.read_table(inputs / "data" / "train.parquet").column("sample_id").to_pylist()
    trained = [i for rec in final(run).values() for i in rec["sample_ids"]]
    assert sorted(trained) == sorted(train_ids)      # the whole epoch, each sample once
    assert metrics["test"] is not None and metrics["steps"] == max(s for s, _ in final(run))
