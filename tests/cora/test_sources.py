"""Parsers on small fixture files in each real format, with every bad row counted by reason."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from trainer.cli import main


def prepare(out, *args):
    """Run `cora prepare` in-process; the dataset.json it wrote, or the exit code on error."""
    rc = main(["prepare", "--out", str(out), "--no-progress", *map(str, args)])
    return json.loads((out / "dataset.json").read_text()) if rc == 0 else rc


def month(year, mon, day=15):
    return int(np.datetime64(f"{year}-{mon:02d}-{day:02d}T12:00:00", "s").astype(np.int64))


def ml1m(tmp_path):
    d = tmp_path / "ml-1m"
    d.mkdir()
    movies = ["1::Toy Story (1995)::Animation", "2::Café Noir (1999)::Drama",
              '3::"Who::What" (2000)::Comedy', "4::Heat (1995)::Action", "broken line without fields"]
    (d / "movies.dat").write_text("\n".join(movies) + "\n", encoding="latin-1")
    (d / "users.dat").write_text("".join(f"{u}::M::25::1::00000\n" for u in (1, 2, 3)), encoding="latin-1")
    m0, tr, va, te = month(2000, 1), month(2001, 4), month(2002, 2), month(2002, 8)  # months 0, 15, 25, 31
    rows = [f"1::1::5::{tr}", f"1::2::4::{tr + 1}", f"1::3::2::{tr + 2}", f"2::1::3::{tr}", f"2::2::5::{tr + 5}",
            f"3::4::4::{tr + 9}", f"1::4::5::{va}", f"2::3::1::{va}", f"3::1::4::{va + 1}",
            f"1::1::1::{te}", f"2::4::5::{te}", f"3::2::3::{te + 1}",
            f"1::2::4::{m0}",                      # month 0: outside CoLLM's window
            "1::2::4",                             # malformed: 3 fields
            f"2::2::x::{tr}",                      # non-numeric rating
            "2::1::4::yesterday",                  # unparsable timestamp
            f"2::99::4::{tr}",                     # item not in movies.dat
            f"9::1::4::{tr}",                      # user not in users.dat
            f"1::1::5::{tr}"]                      # duplicate of the first row
    (d / "ratings.dat").write_text("\n".join(rows) + "\n", encoding="latin-1")
    return d


def test_movielens_1m_protocol_and_row_accounting(tmp_path):
    ds = prepare(tmp_path / "out", "--source", "movielens", "--input", ml1m(tmp_path))
    c = ds["counts"]
    assert c["dropped"] == {"malformed_row": 1, "non_numeric_rating": 1, "unparsable_timestamp": 1,
                            "unresolved_user": 1, "unresolved_item": 1, "duplicate": 1, "outside_time_window": 1}
    assert c["input_rows"] == 19 == c["kept"] + sum(c["dropped"].values())
    assert {s: v["rows"] for s, v in c["splits"].items()} == {"train": 6, "valid": 3, "test": 3}
    assert ds["variant"] == "ml-1m" and ds["label_rule"] == "rating>=4"
    assert ds["split_boundaries"]["train"]["months"] == [14, 23]
    assert c["item_file"] == {"file": "movies.dat", "rows": 5, "kept": 4, "dropped": {"malformed_row": 1}}
    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pandas().set_index("raw_id")
    assert items.loc["2", "title"] == "Café Noir (1999)"                 # latin-1 decoded
    assert items.loc["3", "title"] == '"Who::What" (2000)'               # '::' inside the title, verbatim
    train = pq.read_table(tmp_path / "out" / "train.parquet").to_pandas()
    raw_item = items.reset_index().set_index("item")["raw_id"]
    assert list(train["label"]) == [1, 0, 1, 0, 1, 1]                    # rating >= 4, in time order
    # user 1's third row (item 3) has the earlier positives 1 and 2 as history, most recent last
    assert [raw_item[i] for i in train["history"][3]] == ["1", "2"] and raw_item[train["item"][3]] == "3"


def test_movielens_100k_title_with_separator(tmp_path):
    d = tmp_path / "ml-100k"
    d.mkdir()
    flags = "|".join("0" * 19)
    (d / "u.item").write_text(f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags}\n"
                              f'2|"Fish|Chips (1996)"|01-Jan-1996||http://y|{flags}\n'
                              f"3|Ça Ira (1997)|01-Jan-1997||http://z|{flags}\n", encoding="latin-1")
    sep, mar, apr = month(1997, 9), month(1998, 1), month(1998, 4)      # months 0, 4, 7
    rows = [f"1\t1\t5\t{sep}", f"1\t2\t4\t{sep + 1}", f"2\t1\t2\t{sep}", f"2\t3\t5\t{mar}",
            f"1\t3\t3\t{apr}", f"2\t2\t4\t{apr}", "2\t2\t4\n"]
    (d / "u.data").write_text("\n".join(rows) + "\n", encoding="latin-1")
    ds = prepare(tmp_path / "out", "--source", "movielens", "--input", d)
    assert ds["variant"] == "ml-100k" and ds["split_rule"] == "months:0-3,4-5,6-7"
    assert ds["counts"]["dropped"] == {"malformed_row": 1}
    assert [ds["counts"]["splits"][s]["rows"] for s in ("train", "valid", "test")] == [3, 1, 2]
    titles = pq.read_table(tmp_path / "out" / "items.parquet").to_pandas().set_index("raw_id")["title"]
    assert titles["2"] == "Fish|Chips (1996)" and titles["3"] == "Ça Ira (1997)"


def test_csv_with_mapping_iso_times_and_bad_rows(tmp_path):
    csv = tmp_path / "log.csv"
    lines = ["uid,sku,stars,when,name"]
    for k in range(30):
        lines.append(f"u{k % 5},s{k % 7},{1 + k % 5},2024-{1 + k % 12:02d}-01T00:00:00Z,\"Item, number {k % 7}\"")
    lines += ["u1,s1,great,2024-02-01T00:00:00Z,x", "u1,s1,4,not a date,x", ",s2,4,2024-03-01T00:00:00Z,x"]
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc = prepare(out, "--source", "csv", "--input", csv, "--columns", "user=uid,item=sku,rating=stars")
    assert rc == 2 and not out.exists()                                  # timestamp column 'timestamp' missing
    ds = prepare(out, "--source", "csv", "--input", csv, "--columns",
                 "user=uid,item=sku,rating=stars,timestamp=when,title=name", "--split", "time:0.6,0.2,0.2")
    assert ds["counts"]["dropped"] == {"malformed_row": 1, "non_numeric_rating": 1, "unparsable_timestamp": 1}
    assert ds["counts"]["input_rows"] == 33 and ds["counts"]["kept"] == 30
    titles = pq.read_table(out / "items.parquet").column("title").to_pylist()
    assert "Item, number 0" in titles                                    # quoted comma kept


def test_csv_missing_column_message_names_the_columns(tmp_path, capsys):
    csv = tmp_path / "log.csv"
    csv.write_text("uid,iid,ts\n1,2,3\n")
    assert prepare(tmp_path / "out", "--source", "csv", "--input", csv) == 2
    err = capsys.readouterr().err
    assert "missing user (column 'user')" in err and "columns present: uid, iid, ts" in err and "--columns" in err


def test_parquet_with_labels_and_on_bad_row_error(tmp_path):
    n = 40
    f = pd.DataFrame({"user": [f"a{k % 4}" for k in range(n)], "item": [f"b{k % 6}" for k in range(n)],
                      "label": [k % 2 for k in range(n)], "timestamp": np.arange(n) * 1000 + 1_600_000_000})
    f.loc[5, "label"] = 2
    f.to_parquet(tmp_path / "log.parquet")
    ds = prepare(tmp_path / "out", "--source", "parquet", "--input", tmp_path / "log.parquet")
    assert ds["label_rule"] == "label" and ds["counts"]["dropped"] == {"bad_label": 1}
    assert prepare(tmp_path / "out2", "--source", "parquet", "--input", tmp_path / "log.parquet",
                   "--on-bad-row", "error") == 2
    assert not (tmp_path / "out2").exists()


def collm_frames():
    rng = np.random.default_rng(0)
    frames = {}
    for k, split in enumerate(("train", "valid", "test")):
        n = 12
        iid = rng.integers(0, 9, n)
        his = [list(rng.integers(0, 9, rng.integers(0, 4))) for _ in range(n)]
        frames[split] = pd.DataFrame({
            "uid": rng.integers(0, 5, n), "iid": iid, "label": rng.integers(0, 2, n),
            "timestamp": 1_000_000 * (k + 1) + np.arange(n), "his": his,
            "his_title": [[f"Movie {i}" for i in h] for h in his], "title": [f"Movie {i}" for i in iid],
            "not_cold": 1})
    return frames


def test_collm_parquet_keeps_ids_split_and_history(tmp_path):
    d = tmp_path / "collm"
    d.mkdir()
    frames = collm_frames()
    for split, f in frames.items():
        f.to_parquet(d / f"{split}_ood2.parquet")
    ds = prepare(tmp_path / "out", "--source", "collm", "--input", d)
    assert {s: v["rows"] for s, v in ds["counts"]["splits"].items()} == {"train": 12, "valid": 12, "test": 12}
    test = pq.read_table(tmp_path / "out" / "test.parquet").to_pandas()
    want = frames["test"].sort_values("timestamp")
    assert list(test["item"]) == list(want["iid"]) and list(test["user"]) == list(want["uid"])
    assert [list(h) for h in test["history"]] == [list(h) for h in want["his"]]
    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pandas()
    assert all(items["title"][i] == f"Movie {i}" for i in test["item"])


def test_collm_pickles_need_explicit_permission(tmp_path):
    d = tmp_path / "collm"
    d.mkdir()
    for split, f in collm_frames().items():
        f.to_pickle(d / f"{split}_ood2.pkl")
    assert prepare(tmp_path / "out", "--source", "collm", "--input", d) == 2
    assert not (tmp_path / "out").exists()
    ds = prepare(tmp_path / "out", "--source", "collm", "--input", d, "--allow-pickle")
    assert ds["counts"]["kept"] == 36


def test_collm_folder_as_shipped_uses_the_full_valid_split_unless_told(tmp_path, capsys):
    """CoLLM's ml-1m folder holds valid_ood2.pkl and valid_small_ood2.pkl (a subset of it): the full one is
    used and named; --valid-file picks another; a folder with two candidates of equal standing is refused."""
    d = tmp_path / "collm"
    d.mkdir()
    frames = collm_frames()
    for split, f in frames.items():
        f.to_parquet(d / f"{split}_ood2.parquet")
    frames["valid"].iloc[:5].to_parquet(d / "valid_small_ood2.parquet")
    capsys.readouterr()
    ds = prepare(tmp_path / "out", "--source", "collm", "--input", d)
    assert ds["counts"]["splits"]["valid"]["rows"] == 12
    assert "valid: using valid_ood2.parquet (the full split; not valid_small_ood2.parquet" in capsys.readouterr().err
    ds = prepare(tmp_path / "small", "--source", "collm", "--input", d, "--valid-file", "valid_small_ood2.parquet")
    assert ds["counts"]["splits"]["valid"]["rows"] == 5
    assert prepare(tmp_path / "nope", "--source", "collm", "--input", d, "--valid-file", "valid.pkl") == 2
    assert "--valid-file valid.pkl: no such valid file" in capsys.readouterr().err
    frames["valid"].to_parquet(d / "valid_other.parquet")
    assert prepare(tmp_path / "two", "--source", "collm", "--input", d) == 2
    err = capsys.readouterr().err
    assert "expected one valid file" in err and "choose one with --valid-file NAME" in err


def test_unknown_rules_are_refused_with_the_accepted_forms(tmp_path, capsys):
    args = ("--source", "synthetic", "--users", 20, "--items", 20, "--interactions", 200)
    assert prepare(tmp_path / "a", *args, "--label-rule", "stars>3") == 2
    assert "use e.g. 'rating>=4'" in capsys.readouterr().err
    assert prepare(tmp_path / "b", *args, "--split", "months:1-2") == 2
    assert "three month ranges" in capsys.readouterr().err
    assert prepare(tmp_path / "c", *args, "--split", "months:100-101,102-103,104-105") == 2
    assert "is empty after filtering" in capsys.readouterr().err
