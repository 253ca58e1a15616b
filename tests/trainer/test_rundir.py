"""The run directory as a URI (trainer.rundir, cora.fileio): locations checked before anything runs, a worker's
local mirror synced to moto's S3 server, through an outage (caught up at the next sync, or a clear failure at
the end), and `cora eval --run s3://...` reading a run directory from object storage."""

import json
import threading
import time

import pytest

from cora.config import ConfigError, load
from cora.fileio import location, location_problem, open_fs, read_bytes
from trainer.config import TrainConfig
from trainer.rundir import Mirror, SyncError, owned_files

from .test_checkpoint_storage import Outage


@pytest.mark.parametrize("value,why", [("s3:/bucket/run", "did you mean s3://bucket/run?"),
                                       ("s3:bucket/run", "did you mean s3://bucket/run?"),
                                       ("ftp://host/run", "has the scheme 'ftp'"),
                                       ("s3:///run", "names no bucket")])
def test_a_run_dir_that_would_silently_become_a_local_folder_is_refused(value, why, tmp_path):
    assert why in location_problem(value, "run.run_dir")
    with pytest.raises(ConfigError) as e:
        load(TrainConfig, "configs/demo.yaml", [f"run.run_dir={value}", f"run.checkpoint_uri={value}/c"])
    assert f"run.run_dir={value!r}" in str(e.value) and "run.checkpoint_uri=" in str(e.value)


def test_paths_and_uris_are_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ok in ("runs/a", "/abs/run", "file:///abs/run", "s3://b/r", "gs://b/r/", "C:/x"):
        assert location_problem(ok, "run.run_dir") is None, ok
    assert location("runs/a") == str(tmp_path / "runs" / "a")
    assert location("file:///abs/run") == "/abs/run" and location("gs://b/r/") == "gs://b/r"


@pytest.fixture
def bucket(s3_server, tmp_path):
    fs, _ = open_fs("s3://runs", create_buckets=True)
    fs.create_dir("runs")
    return f"s3://runs/{tmp_path.name}"


def test_a_mirror_copies_only_what_changed_and_what_its_rank_owns(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("CORA_CACHE", str(tmp_path / "cache"))
    zero, one = (Mirror(bucket, owned_files(r), key="k") for r in (0, 1))     # two ranks on one node
    assert zero.local == one.local == tmp_path / "cache" / "runs" / "k"
    (zero.local / "tensorboard").mkdir()
    (zero.local / "tensorboard" / "events.1").write_bytes(b"e1")
    (zero.local / "samples").mkdir()
    (zero.local / "samples" / "rank1.jsonl").write_text('{"step": 1}\n')
    (zero.local / ".staging").mkdir()
    (zero.local / ".staging" / "x").write_text("staged checkpoints are not run files")
    assert zero.sync() == ["tensorboard/events.1"]
    assert one.sync() == ["samples/rank1.jsonl"]
    assert zero.sync() == [] and one.sync() == []                           # nothing changed since
    with open(one.local / "samples" / "rank1.jsonl", "a") as f:
        f.write('{"step": 2}\n')
    assert one.sync(final=True) == ["samples/rank1.jsonl"]
    assert read_bytes(f"{bucket}/samples/rank1.jsonl") == b'{"step": 1}\n{"step": 2}\n'
    # a resumed run on another node: the sample log is fetched before lines are appended to it
    later = Mirror(bucket, owned_files(1), key="other")
    later.pull("samples/rank1.jsonl")
    assert (later.local / "samples" / "rank1.jsonl").read_text().count("step") == 2 and later.pending() == []
    zero.discard()
    assert not zero.local.exists()


def test_a_sync_during_an_outage_loses_nothing_and_catches_up(bucket, s3_server, tmp_path, monkeypatch, capsys):
    """Storage unreachable during a sync: logged, the files stay in the mirror and the next sync copies them;
    a final sync retries through a short outage; one that outlasts run.sync_timeout_s fails, naming the
    files and where they are kept."""
    endpoint, _ = s3_server
    monkeypatch.setenv("CORA_CACHE", str(tmp_path / "cache"))
    proxy = Outage(int(endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("CORA_S3_ENDPOINT", f"http://127.0.0.1:{proxy.port}")
    m = Mirror(bucket, owned_files(0), key="k", timeout_s=2.0, backoff=(0.2, 0.5))
    (m.local / "metrics.json").write_text('{"steps": 1}')
    assert m.sync() == ["metrics.json"]
    proxy.stop()                                                     # the server goes away ...
    (m.local / "metrics.json").write_text('{"steps": 2}')
    (m.local / "export").mkdir()
    (m.local / "export" / "adapter.safetensors").write_bytes(b"w" * 1000)
    t = time.time()
    assert m.sync() == []                                            # an intermediate sync: one quick try
    assert time.time() - t < 30
    assert "failed" in capsys.readouterr().err and sorted(m.pending()) == ["export/adapter.safetensors", "metrics.json"]
    with pytest.raises(SyncError) as e:                              # the end of the run, still down
        m.sync(final=True)
    msg = str(e.value)
    assert "run.sync_timeout_s=2s" in msg and str(m.local) in msg and "metrics.json" in msg
    assert (m.local / "export" / "adapter.safetensors").is_file()   # kept
    proxy.start()                                                    # ... and comes back
    assert sorted(m.sync()) == ["export/adapter.safetensors", "metrics.json"]       # caught up
    assert json.loads(read_bytes(f"{bucket}/metrics.json")) == {"steps": 2}
    proxy.stop()                                                     # a short outage under a final sync
    (m.local / "metrics.json").write_text('{"steps": 3}')
    m.timeout_s = 30.0
    threading.Timer(1.5, proxy.start).start()
    assert m.sync(final=True) == ["metrics.json"]
    assert json.loads(read_bytes(f"{bucket}/metrics.json")) == {"steps": 3}

