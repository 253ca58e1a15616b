"""Multi-domain preparation (`cora prepare --target-domain`, cora/data/domains.py): OUT/source and
OUT/target complete and consistent, users shared with their planted factors, reproducible, csv input
with a domain column, bad input refused; single-domain output unchanged."""

import json
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from cora.data import write
from cora.data.domains import THINGS, planted_factors
from cora.data.schema import SPLITS, DatasetError, read_manifest
from trainer.cli import main

from .test_prepare import SMALL
from .test_sources import prepare

MULTI = ("--source", "synthetic", "--domains", "movies,books,items", "--target-domain", "items", "--users", 40,
         "--items", 25, "--interactions", 400, "--noise", 0, "--seed", 5, "--samples-per-shard", 100,
         "--history-stored", 6, "--history-in-prompt", 3)


def prepare_pair(out, *args):
    """Run `cora prepare` in-process; {"source": dataset.json, "target": dataset.json}, or the exit code."""
    rc = main(["prepare", "--out", str(out), "--no-progress", *map(str, args)])
    if rc != 0:
        return rc
    return {p: json.loads((out / p / "dataset.json").read_text()) for p in ("source", "target")}


def tables(d):
    return {s: pq.read_table(d / f"{s}.parquet").to_pandas() for s in SPLITS}


def samples(d, ds, split):
    return [json.loads(s["json"]) for s in wds.WebDataset([str(d / n) for n in ds["shards"][split]],
                                                          shardshuffle=False)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("domains") / "cocktail"
    return out, prepare_pair(out, *MULTI)


def test_source_and_target_hold_their_domains_completely_with_every_sample_tagged(pair):
    out, ds = pair
    assert sorted(p.name for p in out.iterdir()) == ["source", "target"]
    assert (ds["source"]["domains"], ds["source"]["domain"]) == (["books", "movies"], None)
    assert (ds["target"]["domains"], ds["target"]["domain"]) == (["items"], "items")
    for part, held in (("source", {"books", "movies"}), ("target", {"items"})):
        d, m = out / part, ds[part]
        assert write.verify(d)["fingerprint"] == m["fingerprint"]           # every file checksummed
        items = pq.read_table(d / "items.parquet").to_pandas()
        assert list(items["item"]) == list(range(m["num_items"]))
        for split, f in tables(d).items():
            assert set(f["domain"]) <= held and len(f) == m["counts"]["splits"][split]["rows"]
            assert (items["domain"].to_numpy()[f["item"]] == f["domain"].to_numpy()).all()   # item and row agree
            for h, dom in zip(f["history"], f["domain"]):                    # histories stay in the domain
                assert (items["domain"].to_numpy()[np.asarray(h, dtype=int)] == dom).all()
            got = samples(d, m, split)
            assert [s["sample_id"] for s in got] == list(f["sample_id"])
            assert [s["domain"] for s in got] == list(f["domain"])
            assert [s["title"] for s in got] == list(items["title"].to_numpy()[f["item"]])
        assert set().union(*(set(f["domain"]) for f in tables(d).values())) == held
        ids = np.concatenate([f["sample_id"].to_numpy() for f in tables(d).values()])
        assert sorted(ids) == list(range(m["counts"]["kept"]))              # 0..n-1 per directory
        c = m["counts"]
        assert c["input_rows"] == 3 * 400 == c["kept"] + sum(c["dropped"].values())
    assert ds["source"]["counts"]["dropped"] == {"other_directory": ds["target"]["counts"]["kept"]}
    assert ds["target"]["counts"]["dropped"] == {"other_directory": ds["source"]["counts"]["kept"]}
    assert ds["source"]["counts"]["domains"]["books"]["rows"] == 400 == ds["target"]["counts"]["domains"]["items"]["rows"]


def test_no_target_item_in_source_and_titles_show_the_domain(pair):
    out, ds = pair
    src = pq.read_table(out / "source" / "items.parquet").to_pandas()
    tgt = pq.read_table(out / "target" / "items.parquet").to_pandas()
    assert not set(src["raw_id"]) & set(tgt["raw_id"])
    assert all(r.startswith(f"{d}-i") for r, d in zip(src["raw_id"], src["domain"]))
    assert ds["source"]["multi_domain"]["overlap"]["removed_source_rows"] == 0     # items are per domain here
    pattern = {"movies": r"^\w+ \w+ \(\d{4}\)$", "books": r"^\w+ \w+: A Novel \(\d{4}\)$",
               "items": r"^\w+ \w+ (" + "|".join(THINGS) + ")$"}
    for f in (src, tgt):
        for title, dom in zip(f["title"], f["domain"]):
            assert re.match(pattern[dom], title), (dom, title)


def test_users_are_shared_with_their_planted_factors(pair):
    """Same user id, same planted factors: with --noise 0 every label of both directories is exactly
    1[u . v_domain > 0] for the user's one factor vector and the item's factors in its domain."""
    out, ds = pair
    users = pq.read_table(out / "source" / "users.parquet")
    assert users.equals(pq.read_table(out / "target" / "users.parquet"))
    assert ds["source"]["num_users"] == ds["target"]["num_users"] == users.num_rows
    user_row = np.array([int(r[1:]) for r in users.column("raw_id").to_pylist()])
    uf, vf = planted_factors(ds["target"])
    assert set(vf) == {"movies", "books", "items"}
    shared_users = 0
    seen = {}
    for part in ("source", "target"):
        items = pq.read_table(out / part / "items.parquet").to_pandas()
        item_row = np.array([int(r.rsplit("-i", 1)[1]) for r in items["raw_id"]])
        for f in tables(out / part).values():
            u, i = user_row[f["user"].to_numpy()], item_row[f["item"].to_numpy()]
            v = np.stack([vf[d][k] for d, k in zip(f["domain"], i)])
            np.testing.assert_array_equal(f["label"].to_numpy(), ((uf[u] * v).sum(1) > 0).astype(np.int8))
            seen.setdefault(part, set()).update(f["user"])
    shared_users = len(seen["source"] & seen["target"])
    assert shared_users > 30                                            # most users are in both
    assert ds["source"]["split_boundaries"] == ds["target"]["split_boundaries"]


def test_histories_are_the_earlier_positives_in_the_same_domain_and_cold_is_per_directory(pair):
    out, _ = pair
    for part in ("source", "target"):
        frames = tables(out / part)
        rows = sorted((r for f in frames.values() for r in f.itertuples()), key=lambda r: r.sample_id)
        seen: dict[tuple, list[int]] = {}
        for r in rows:
            assert list(r.history) == seen.get((r.user, r.domain), [])[-6:]
            if r.label:
                seen.setdefault((r.user, r.domain), []).append(r.item)
        train_users, train_items = set(frames["train"]["user"]), set(frames["train"]["item"])
        for f in frames.values():
            assert list(f["cold_user"]) == [u not in train_users for u in f["user"]]
            assert list(f["cold_item"]) == [i not in train_items for i in f["item"]]


def test_multi_domain_is_reproducible_and_follows_the_seed(pair, tmp_path):
    out, ds = pair
    again = prepare_pair(tmp_path / "again", *MULTI)
    for part in ("source", "target"):
        assert again[part]["files"] == ds[part]["files"]                 # byte-identical outputs
    reordered = [a if a != "movies,books,items" else "items,movies,books" for a in MULTI]
    assert prepare_pair(tmp_path / "reordered", *reordered)["source"]["files"] == ds["source"]["files"]
    other = prepare_pair(tmp_path / "other", *MULTI[:-7], 6, *MULTI[-6:])
    assert MULTI[-7] == 5 and other["target"]["files"]["train.parquet"] != ds["target"]["files"]["train.parquet"]


def test_rerun_is_a_no_op_another_dataset_is_refused_and_the_parent_is_not_a_data_dir(pair, tmp_path, capsys):
    out = tmp_path / "c"
    first = prepare_pair(out, *MULTI)
    mtime = (out / "source" / "dataset.json").stat().st_mtime_ns
    assert prepare_pair(out, *MULTI)["source"]["fingerprint"] == first["source"]["fingerprint"]
    assert (out / "source" / "dataset.json").stat().st_mtime_ns == mtime
    assert "nothing to do" in capsys.readouterr().err
    assert prepare_pair(out, *MULTI[:-7], 6, *MULTI[-6:]) == 2
    assert "already holds something else than this source/target pair" in capsys.readouterr().err
    replaced = prepare_pair(out, *MULTI[:-7], 6, *MULTI[-6:], "--overwrite")
    assert replaced["source"]["fingerprint"] != first["source"]["fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]          # no temporary or old copies left
    with pytest.raises(DatasetError, match=f"{out} holds a multi-domain preparation.*use {out}/source .* or {out}/target"):
        read_manifest(out)
    single = tmp_path / "single"
    prepare(single, *SMALL)
    assert prepare_pair(single, *MULTI) == 2                            # a single-domain dir is not replaced silently
    assert (single / "dataset.json").is_file()


def test_rank_split_goes_to_the_target_only(tmp_path):
    ds = prepare_pair(tmp_path / "r", *MULTI, "--rank-negatives", 4)
    assert "rank" not in ds["source"]["shards"] and "rank" in ds["target"]["shards"]
    rank = pq.read_table(tmp_path / "r" / "target" / "rank.parquet").to_pandas()
    assert set(rank["domain"]) == {"items"} and len(rank) == ds["target"]["rank"]["queries"] * 5
    assert ds["source"]["multi_domain"]["rank_split"] == "OUT/target only"


def test_single_domain_output_is_unchanged(tmp_path):
    """Fingerprints and shard checksums recorded before multi-domain support existed."""
    ds = prepare(tmp_path / "a", *SMALL)
    assert ds["fingerprint"] == "bec8e4f22e76da97221416c9afa01ba3bed02a56ffc24554e88b665115c61822"
    assert {k: v["sha256"][:16] for k, v in ds["files"].items() if k.startswith("shards")} == {
        "shards/test-000000.tar": "8f3419c6c76f4d2a", "shards/train-000000.tar": "5c564816f3a2a959",
        "shards/valid-000000.tar": "eb847aed3cff8ba2"}
    ds = prepare(tmp_path / "b", *SMALL, "--rank-negatives", 5, "--rule", "additive")
    assert ds["fingerprint"] == "e235ccbb22ed85829a0a18c7e5132fbe7b582b9347e89dd2f51c1caa96e32a39"
    assert {k: v["sha256"][:16] for k, v in ds["files"].items() if k.startswith("shards")} == {
        "shards/rank-000000.tar": "88993e2b628d284e", "shards/test-000000.tar": "61bdc04205cd3529",
        "shards/train-000000.tar": "f071aae6bb441122", "shards/valid-000000.tar": "dce5fb1cffbc0bdc"}
    assert "domains" not in ds and "domain" not in pq.read_schema(tmp_path / "b" / "train.parquet").names
    assert "domain" not in pq.read_schema(tmp_path / "b" / "items.parquet").names



def test_multi_domain_static_rules_output_is_unchanged(pair, tmp_path):
    """Fingerprints and table checksums recorded before the sequential rule existed (its draws moved into
    cora/data/planted.py, its --window flag added): the static rules' multi-domain output is byte-identical."""
    _, ds = pair
    add = prepare_pair(tmp_path / "add", *MULTI, "--rule", "additive", "--noise", "0.3")
    want = {("dot", "source"): ("e7926207ef58100a", "4befc22aca392e2e", "39d2c6178e8e899e"),
            ("dot", "target"): ("951410976b640b91", "b092f3de9237eebf", "4b0c4647062c10a2"),
            ("additive", "source"): ("e57917dbcbb3afbc", "3e20733f5617f671", "b8b3ba63a044af19"),
            ("additive", "target"): ("bd5199045014469d", "0c14336b546823ff", "b471210ffe2f2c97")}
    for (rule, part), pins in want.items():
        m = (ds if rule == "dot" else add)[part]
        assert (m["fingerprint"][:16], m["files"]["test.parquet"]["sha256"][:16],
                m["files"]["train.parquet"]["sha256"][:16]) == pins, (rule, part)
        assert "window" not in m["options"]["synthetic"] and "window" not in m["multi_domain"]["synthetic"]

# ----------------------------------------------------------------------------- csv input with a domain column

def csv_log(path):
    """Users a, b, c over three categories; item 7 is both a Books (target) and a Toys item, item 9 both a
    Toys and a Movies item; one row has no category."""
    rows = []
    t = 1_600_000_000
    for k, (cat, item) in enumerate([("Books", 1), ("Books", 7), ("Toys", 7), ("Toys", 9), ("Movies", 9),
                                     ("Movies", 3), ("Toys", 4), ("Books", 2), ("Movies", 5), ("Toys", 6)] * 3):
        rows.append({"uid": "abc"[k % 3], "sku": item, "stars": 1 + k % 5, "ts": t + 1000 * k,
                     "name": f"thing {item}", "category": cat})
    rows.append({"uid": "a", "sku": 1, "stars": 5, "ts": t, "name": "x", "category": None})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


CSV = ("--source", "csv", "--columns", "user=uid,item=sku,rating=stars,timestamp=ts,title=name,domain=category")


def test_csv_domain_column_mapped_split_and_overlap_removed(tmp_path):
    log = csv_log(tmp_path / "log.csv")
    ds = prepare_pair(tmp_path / "out", *CSV, "--input", log, "--target-domain", "books",
                      "--domain-map", "Books=books,Movies=movies,Toys=items", "--split", "time:0.6,0.2,0.2")
    src, tgt = ds["source"], ds["target"]
    assert (src["domains"], tgt["domains"]) == (["items", "movies"], ["books"])
    assert src["counts"]["dropped"] == {"malformed_row": 1, "target_item_overlap": 3, "other_directory": 9}
    assert src["counts"]["kept"] == 18 and tgt["counts"]["kept"] == 9
    assert src["multi_domain"]["overlap"]["removed_source_rows"] == 3 == 3 * src["multi_domain"]["overlap"]["removed_item_ids"]
    items = pq.read_table(tmp_path / "out" / "source" / "items.parquet").to_pandas()
    assert "7" not in set(items["raw_id"])                             # the target's item 7 is not in source
    nine = items[items["raw_id"] == "9"]                                 # an item is a (domain, raw id) pair
    assert sorted(nine["domain"]) == ["items", "movies"] and list(nine["title"]) == ["thing 9"] * 2
    assert set(pq.read_table(tmp_path / "out" / "target" / "items.parquet").column("raw_id").to_pylist()) == {"1", "2", "7"}


def _err(capsys, out, *args):
    rc = prepare_pair(out, *args)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args, want", [
    (("--domains", "movies,games", "--target-domain", "movies"),
     ["--domains 'movies,games': 'games' is not a prompt domain", "books, items, movies"]),
    (("--domains", "movies,books", "--target-domain", "items"),
     ["--target-domain 'items' is not in --domains 'movies,books'", "add it to --domains"]),
    (("--domains", "movies", "--target-domain", "movies"),
     ["--domains 'movies' names 1 domain(s)", "at least one source domain", "for one domain use --domain"]),
    (("--domains", "movies,movies", "--target-domain", "movies"), ["lists 'movies' more than once"]),
    (("--domains", "movies,books"), ["--domains is for a multi-domain preparation", "--target-domain"]),
    (("--target-domain", "books"), ["--target-domain books: synthetic multi-domain data needs --domains"]),
    (("--target-domain", "games", "--domains", "movies,books"), ["--target-domain 'games' is not a prompt domain",
                                                                  "books, items, movies"]),
    (("--domains", "movies,books", "--target-domain", "books", "--domain", "movies"),
     ["--domain movies sets the one domain", "drop --domain"]),
    (("--domains", "movies,books", "--target-domain", "books", "--domain-map", "a=books"), ["drop --domain-map"]),
])
def test_bad_synthetic_domain_flags_are_refused(tmp_path, capsys, args, want):
    rc, err = _err(capsys, tmp_path / "o", "--source", "synthetic", "--users", 10, "--items", 10,
                   "--interactions", 50, *args)
    assert rc == 2 and "Traceback" not in err and all(w in err for w in want), err
    assert not (tmp_path / "o").exists()


def test_bad_csv_domains_are_refused(tmp_path, capsys):
    log, out = csv_log(tmp_path / "log.csv"), tmp_path / "o"
    rc, err = _err(capsys, out, *CSV, "--input", log, "--target-domain", "books")
    assert rc == 2 and "domain column 'category': 'Books', 'Movies', 'Toys' not a prompt domain" in err
    assert "the domains are books, items, movies" in err and "--domain-map VALUE=DOMAIN" in err
    rc, err = _err(capsys, out, *CSV, "--input", log, "--target-domain", "books", "--domain-map", "Books=novels")
    assert rc == 2 and "--domain-map entry 'Books=novels': expected VALUE=DOMAIN with DOMAIN one of books" in err
    rc, err = _err(capsys, out, *CSV, "--input", log, "--target-domain", "books",
                   "--domain-map", "Books=movies,Toys=movies,Movies=movies")
    assert rc == 2 and "--target-domain books: no row of the input has that domain" in err and "holds movies" in err
    rc, err = _err(capsys, out, *CSV, "--input", log, "--target-domain", "movies",
                   "--domain-map", "Books=movies,Toys=movies,Movies=movies")
    assert rc == 2 and "domain column 'category' holds only 'movies'" in err and "use --domain movies" in err
    rc, err = _err(capsys, out, *CSV, "--input", log)                  # a domain column needs --target-domain
    assert rc == 2 and "--columns domain=... is for a multi-domain preparation" in err
    rc, err = _err(capsys, out, *CSV, "--input", log, "--target-domain", "books", "--domains", "books,movies")
    assert rc == 2 and "--domains 'books,movies' is for --source synthetic" in err
    rc, err = _err(capsys, out, "--source", "csv", "--columns", "user=uid,item=sku,rating=stars,timestamp=ts",
                   "--input", log, "--target-domain", "books")
    assert rc == 2 and "missing domain (column 'domain')" in err and "domain=..." in err
    rc, err = _err(capsys, out, "--source", "movielens", "--input", tmp_path, "--target-domain", "movies")
    assert rc == 2 and "--source movielens has one domain per dataset" in err
    assert not out.exists()
