"""The prepared directory: histories, shards, checksums, determinism, atomic and safe replacement, the rank split."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from cora.data import candidates, write
from cora.data.schema import DatasetError, SPLITS

from .test_sources import collm_frames, prepare

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


# ----------------------------------------------------------------------------- the rank split (--rank-negatives)
N_NEG = 10


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranked") / "data"
    return out, prepare(out, *SMALL, "--samples-per-shard", 100, "--history-stored", 5, "--history-in-prompt", 3,
                        "--rank-negatives", N_NEG)


def _rank_checks(out, ds, n_neg):
    """Brute-force checks of rank.parquet against the other splits; returns the rank frame."""
    frames = _all(out)
    rank = pq.read_table(out / "rank.parquet").to_pandas()
    test = frames["test"].set_index("sample_id")
    assert list(rank.columns) == list(frames["test"].columns) + ["query"]
    assert str(rank["query"].dtype) == "int64"
    seen: dict[int, set] = {}                                           # the user's rows, all splits ...
    for f in frames.values():
        for u, i in zip(f["user"], f["item"]):
            seen.setdefault(u, set()).add(i)
    positives = frames["test"][frames["test"]["label"] == 1]
    for u, h in zip(positives["user"], positives["history"]):           # ... and their test positives' histories
        seen[u] |= set(h)
    train_items = set(frames["train"]["item"])
    for q, g in rank.groupby("query", sort=False):
        pos, neg = g.iloc[0], g.iloc[1:]
        t = test.loc[q]                                                # the query is a test positive's sample_id
        assert t.label == 1 and list(g["label"]) == [1] + [0] * n_neg
        same = ("user", "item", "timestamp", "cold_user", "cold_item")
        assert [pos[c] for c in same] + [list(pos["history"])] == [t[c] for c in same] + [list(t["history"])]
        assert neg["rating"].isna().all()
        assert (neg["user"] == t.user).all() and (neg["timestamp"] == t.timestamp).all()
        assert all(list(h) == list(t.history) for h in neg["history"]) and (neg["cold_user"] == t.cold_user).all()
        assert neg["item"].nunique() == n_neg
        assert not seen[t.user] & set(neg["item"]), f"query {q}: a negative the user interacted with"
        assert list(g["cold_item"]) == [i not in train_items for i in g["item"]]
    too_few = sum(ds["num_items"] - len(seen[u]) < n_neg for u in positives["user"])
    assert ds["rank"] == {"negatives": n_neg, "seed": ds["rank"]["seed"], "queries": rank["query"].nunique(),
                          "skipped": {"too_few_items": too_few}}
    assert ds["rank"]["queries"] + too_few == len(positives) and len(rank) == ds["rank"]["queries"] * (n_neg + 1)
    ids = np.concatenate([f["sample_id"].to_numpy() for f in frames.values()] + [rank["sample_id"].to_numpy()])
    assert len(np.unique(ids)) == len(ids)                             # sample ids unique across all splits
    return rank


def test_rank_split_is_each_test_positive_with_unseen_negatives(ranked):
    out, ds = ranked
    rank = _rank_checks(out, ds, N_NEG)
    assert ds["rank"]["queries"] > 30 and ds["rank"]["skipped"]["too_few_items"] > 0   # both paths taken
    assert ds["rank"]["seed"] == 3 and ds["options"]["rank"] == {"negatives": N_NEG, "seed": 3}
    assert rank["item"].nunique() == ds["num_items"]                  # negatives spread over the item set


def test_rank_split_in_dataset_json_with_checksums_and_shards(ranked):
    out, ds = ranked
    rank = pq.read_table(out / "rank.parquet").to_pandas()
    c = ds["counts"]["splits"]["rank"]
    assert (c["rows"], c["positives"]) == (len(rank), ds["rank"]["queries"])
    assert ds["shards"]["rank"] == [f"shards/rank-{k:06d}.tar" for k in range(-(-len(rank) // 100))]
    assert {"rank.parquet", *ds["shards"]["rank"]} <= set(ds["files"])
    assert write.verify(out)["rank"] == ds["rank"]
    titles = pq.read_table(out / "items.parquet").column("title").to_pylist()
    samples = [json.loads(s["json"]) for s in wds.WebDataset([str(out / n) for n in ds["shards"]["rank"]],
                                                              shardshuffle=False)]
    assert [s["sample_id"] for s in samples] == list(rank["sample_id"])
    for s, r in zip(samples, rank.itertuples()):
        assert (s["user"], s["item"], s["label"], s["history"], s["query"], s["cold_item"]) == \
            (r.user, r.item, r.label, list(r.history), r.query, r.cold_item)
        assert s["title"] == titles[r.item] and s["history_titles"] == [titles[i] for i in r.history[-3:]]
    assert all("query" not in json.loads(s["json"])                    # the other splits' samples are unchanged
               for s in wds.WebDataset([str(out / ds["shards"]["test"][0])], shardshuffle=False))


def test_rank_split_leaves_the_readers_of_train_valid_test_alone(ranked, synth):
    from cluster.interactions import split_shards
    from cora.cf.data import load_data
    out, ds = ranked
    base_out, base = synth
    for name in ("train.parquet", "valid.parquet", "test.parquet", "items.parquet", "users.parquet"):
        assert ds["files"][name] == base["files"][name]               # the three splits are byte-identical
    assert {k: v for k, v in ds["counts"]["splits"].items() if k != "rank"} == base["counts"]["splits"]
    paths, sizes = split_shards(ds, str(out), "rank")
    assert sum(sizes) == ds["counts"]["splits"]["rank"]["rows"] and all(p.endswith(".tar") for p in paths)
    data, _ = load_data(out)
    assert len(data.test.labels) == ds["counts"]["splits"]["test"]["rows"]
    assert "rank" not in base and "rank" not in base["shards"] and "rank" not in base["options"]
    assert not (base_out / "rank.parquet").exists()


def test_rank_split_is_reproducible_and_follows_the_seed(tmp_path):
    rng = np.random.default_rng(0)
    n = 900
    log = pd.DataFrame({"user": [f"a{k}" for k in rng.integers(0, 30, n)], "item": [f"b{k}" for k in rng.integers(0, 80, n)],
                        "label": rng.integers(0, 2, n), "timestamp": 1_600_000_000 + np.arange(n) * 600})
    log.to_parquet(tmp_path / "log.parquet")
    args = ("--source", "parquet", "--input", tmp_path / "log.parquet", "--rank-negatives", 12)
    first = prepare(tmp_path / "a", *args)
    again = prepare(tmp_path / "b", *args)
    other = prepare(tmp_path / "c", *args, "--seed", 1)
    assert again["files"] == first["files"]                            # byte-identical, rank split included
    assert first["rank"]["seed"] == 0 and other["rank"]["seed"] == 1
    assert other["files"]["test.parquet"] == first["files"]["test.parquet"]   # the seed moves only the negatives
    a, c = (_rank_checks(tmp_path / d, ds, 12) for d, ds in (("a", first), ("c", other)))
    assert list(a["query"]) == list(c["query"]) and list(a["item"][a["label"] == 1]) == list(c["item"][c["label"] == 1])
    assert (a["item"].to_numpy() != c["item"].to_numpy()).mean() > 0.5
    assert first["fingerprint"] != other["fingerprint"]


def test_rank_negatives_exclude_the_input_history_of_collm(tmp_path):
    d = tmp_path / "collm"
    d.mkdir()
    for split, f in collm_frames().items():
        f.to_parquet(d / f"{split}_ood2.parquet")
    ds = prepare(tmp_path / "out", "--source", "collm", "--input", d, "--rank-negatives", 2)
    rank = _rank_checks(tmp_path / "out", ds, 2)                       # taken = the user's rows + histories
    rows = {(u, i) for f in _all(tmp_path / "out").values() for u, i in zip(f["user"], f["item"])}
    pos = rank[rank["label"] == 1]
    assert any((u, i) not in rows for u, h in zip(pos["user"], pos["history"]) for i in h)   # the case is met


def test_rank_negatives_refused_or_impossible(tmp_path, capsys):
    assert prepare(tmp_path / "a", *SMALL, "--rank-negatives", -1) == 2
    assert "--rank-negatives must be >= 0, got -1" in capsys.readouterr().err
    assert prepare(tmp_path / "b", *SMALL, "--rank-negatives", 40) == 2    # 40 items: nothing left to draw
    assert "none of the 68 test positives has a user with 40 items left" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    prepare(tmp_path / "c", *SMALL)
    assert prepare(tmp_path / "c", *SMALL, "--rank-negatives", 5) == 2     # another dataset: not silently replaced
    assert "already holds a different dataset" in capsys.readouterr().err


def test_draw_is_uniform_over_the_free_items():
    taken = np.array([0, 3, 4, 5, 9])
    free = np.setdiff1d(np.arange(12), taken)
    for seed in range(50):                                             # the k-th free item, exactly
        k = np.random.default_rng(seed).choice(len(free), 4, replace=False)
        assert list(candidates.draw(taken, 12, 4, np.random.default_rng(seed))) == list(free[k])
    rng = np.random.default_rng(0)
    hits = np.bincount(np.concatenate([candidates.draw(taken, 12, 3, rng) for _ in range(7000)]), minlength=12)
    assert hits[taken].sum() == 0
    assert np.abs(hits[free] / 3000 - 1).max() < 0.1                  # 7000 * 3 / 7 = 3000 draws per free item
