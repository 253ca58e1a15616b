"""The prepared directory: histories, shards, checksums, determinism, atomic and safe replacement."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from cora.data import write
from cora.data.schema import DatasetError, SPLITS

from .test_sources import prepare

SMALL = ("--source", "synthetic", "--users", 60, "--items", 40, "--interactions", 1500, "--seed", 3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, prepare(out, *SMALL, "--samples-per-shard", 100, "--history-stored", 5, "--history-in-prompt", 3)


def _all(out):
    return {s: pq.read_table(out / f"{s}.parquet").to_pandas() for s in SPLITS}


def test_history_is_the_earlier_positives_of_the_user(synth):
    out, _ = synth
    frames = _all(out)
    rows = sorted((r for f in frames.values() for r in f.itertuples()), key=lambda r: r.sample_id)
    seen: dict[int, list[int]] = {}
    for r in rows:                                       # brute force, in sample_id (= time) order
        assert list(r.history) == seen.get(r.user, [])[-5:]
        if r.label:
            seen.setdefault(r.user, []).append(r.item)
    ts = {s: f["timestamp"] for s, f in frames.items()}
    assert ts["train"].max() <= ts["valid"].min() and ts["valid"].max() <= ts["test"].min()


def test_cold_flags_are_relative_to_train(synth):
    out, ds = synth
    frames = _all(out)
    train_users, train_items = set(frames["train"]["user"]), set(frames["train"]["item"])
    for f in frames.values():
        assert list(f["cold_user"]) == [u not in train_users for u in f["user"]]
        assert list(f["cold_item"]) == [i not in train_items for i in f["item"]]
    assert ds["counts"]["splits"]["test"]["cold"] == int((frames["test"]["cold_user"] | frames["test"]["cold_item"]).sum())


def test_shards_hold_exactly_the_parquet_samples(synth):
    out, ds = synth
    titles = pq.read_table(out / "items.parquet").column("title").to_pylist()
    for split, f in _all(out).items():
        names = ds["shards"][split]
        assert len(names) == -(-len(f) // 100)                        # ceil(rows / samples_per_shard)
        samples = [json.loads(s["json"]) for s in wds.WebDataset([str(out / n) for n in names], shardshuffle=False)]
        assert [s["sample_id"] for s in samples] == list(f["sample_id"])
        for s, r in zip(samples, f.itertuples()):
            assert (s["user"], s["item"], s["label"], s["history"]) == (r.user, r.item, r.label, list(r.history))
            assert s["title"] == titles[r.item] and s["history_titles"] == [titles[i] for i in r.history[-3:]]
    ids = np.concatenate([f["sample_id"].to_numpy() for f in _all(out).values()])
    assert len(np.unique(ids)) == len(ids) == ds["counts"]["kept"]


def test_synthetic_is_deterministic_and_checksummed(synth, tmp_path):
    out, ds = synth
    again = prepare(tmp_path / "again", *SMALL, "--samples-per-shard", 100, "--history-stored", 5,
                    "--history-in-prompt", 3)
    assert again["files"] == ds["files"]                               # byte-identical outputs
    assert write.verify(out)["fingerprint"] == ds["fingerprint"]
    other = prepare(tmp_path / "other", *SMALL[:-1], 4)
    assert other["files"]["train.parquet"] != ds["files"]["train.parquet"]


def test_verify_finds_a_truncated_shard(tmp_path):
    out = tmp_path / "d"
    ds = prepare(out, *SMALL)
    shard = out / ds["shards"]["train"][0]
    shard.write_bytes(shard.read_bytes()[:-512])
    with pytest.raises(DatasetError, match=r"bytes where the manifest says \d+ \(truncated or replaced\) \(dataset.json\); prepare the data again"):
        write.verify(out)


def test_existing_out_same_different_and_overwrite(tmp_path, capsys):
    out = tmp_path / "d"
    first = prepare(out, *SMALL)
    mtime = (out / "dataset.json").stat().st_mtime_ns
    assert prepare(out, *SMALL)["fingerprint"] == first["fingerprint"]
    assert (out / "dataset.json").stat().st_mtime_ns == mtime and "nothing to do" in capsys.readouterr().err
    assert prepare(out, *SMALL[:-1], 9) == 2                            # a different dataset: refused
    assert "already holds a different dataset" in capsys.readouterr().err
    assert json.loads((out / "dataset.json").read_text())["fingerprint"] == first["fingerprint"]
    replaced = prepare(out, *SMALL[:-1], 9, "--overwrite")
    assert replaced["fingerprint"] != first["fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]          # no temporary or old copies left


def test_a_failed_write_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):          # fault injection: the disk "fills" at the second split
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    real = write.write_shards
    monkeypatch.setattr(write, "write_shards", failing)
    with pytest.raises(OSError):
        prepare(tmp_path / "d", *SMALL)
    assert list(tmp_path.iterdir()) == []
