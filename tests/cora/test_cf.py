"""Tests for cora.cf: the CF models (MF, LightGCN, SASRec), their trainer, CF_DIR files and CLI.

The data is planted: user and item factors u, v ~ N(0, I_k), label = 1[u.v / sqrt(k) + 0.3 eps > 0],
random timestamps, split by time (80/10/10); the last 10 users interact only in the test period, so
test has a cold subset. Every model must learn the planted preferences well above chance.

Tests that train for tens of epochs (the mf_run / lightgcn_run / sasrec_run fixtures) are marked slow;
``quick_run`` (one epoch) serves the tests that only need some CF_DIR.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from cora.cf import (HISTORY_PAD, CFBatch, CFConfig, SASRec, build_model, fit_cf, load_cf, load_data,
                     pad_histories, read_embeddings, train_cf)
from cora.cf import cli as cf_cli
from cora.cf.train import predict, sasrec_user_histories
from cora.config import ConfigError
from cora.data.schema import INTERACTIONS, SCHEMA_VERSION, DatasetError
from cora.metrics import auc

N_USERS, N_ITEMS, DIM = 300, 200, 32
FAST = dict(dim=DIM, lr=1e-2, batch_size=256, patience=2)
# Thresholds on test AUC (planted Bayes AUC ~0.95; observed: MF ~0.88, LightGCN ~0.87, SASRec ~0.87)
MF_MIN_AUC, OTHER_MIN_AUC = 0.80, 0.75


# ----------------------------------------------------------------------------- planted data dir
def _histories(users: np.ndarray, items: np.ndarray, labels: np.ndarray, stored: int = 50) -> list[list[int]]:
    """Per row (rows in time order): the user's earlier positive items, most recent last."""
    seen: dict[int, list[int]] = {}
    out = []
    for u, i, y in zip(users.tolist(), items.tolist(), labels.tolist()):
        h = seen.setdefault(u, [])
        out.append(h[-stored:])
        if y:
            h.append(i)
    return out


def write_split(path: Path, rows: dict, a: int, b: int, train_users: set, train_items: set) -> None:
    s = slice(a, b)
    users, items = rows["user"][s], rows["item"][s]
    table = pa.Table.from_pydict({
        "sample_id": np.arange(a, b, dtype=np.int64), "user": users.astype(np.int32),
        "item": items.astype(np.int32), "label": rows["label"][s].astype(np.int8),
        "rating": pa.nulls(b - a, pa.float32()), "timestamp": rows["timestamp"][s].astype(np.int64),
        "history": pa.array(rows["history"][a:b], pa.list_(pa.int32())),
        "cold_user": np.array([u not in train_users for u in users.tolist()], dtype=bool),
        "cold_item": np.array([i not in train_items for i in items.tolist()], dtype=bool)}, schema=INTERACTIONS)
    pq.write_table(table, path)


def make_data_dir(root: Path, n: int = 20000, k: int = 4, noise: float = 0.3, n_late_users: int = 10,
                  seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    uf, vf = rng.standard_normal((N_USERS, k)), rng.standard_normal((N_ITEMS, k))
    pairs = rng.choice(N_USERS * N_ITEMS, n, replace=False)
    users, items = pairs // N_ITEMS, pairs % N_ITEMS
    labels = ((uf[users] * vf[items]).sum(1) / np.sqrt(k) + noise * rng.standard_normal(n) > 0).astype(np.int8)
    ts = rng.integers(0, 1_000_000, n)
    late = users >= N_USERS - n_late_users
    ts[late] = rng.integers(900_001, 1_000_000, int(late.sum()))
    order = np.argsort(ts, kind="stable")
    rows = {"user": users[order], "item": items[order], "label": labels[order], "timestamp": ts[order]}
    rows["history"] = _histories(rows["user"], rows["item"], rows["label"])
    cut = np.searchsorted(rows["timestamp"], [800_000, 900_001])
    train_users, train_items = set(rows["user"][:cut[0]].tolist()), set(rows["item"][:cut[0]].tolist())
    for name, (a, b) in {"train": (0, cut[0]), "valid": (cut[0], cut[1]), "test": (cut[1], n)}.items():
        write_split(root / f"{name}.parquet", rows, int(a), int(b), train_users, train_items)
    manifest = {"schema_version": SCHEMA_VERSION, "num_users": N_USERS, "num_items": N_ITEMS,
                "checksums": {"train.parquet": "planted"}}
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("cf") / "data")


def _train(data_dir: Path, out: Path, **cfg) -> tuple[Path, dict]:
    metrics = train_cf(data_dir, out, CFConfig(**cfg), progress=False)
    return out, metrics


@pytest.fixture(scope="module")
def mf_run(data_dir, tmp_path_factory):
    return _train(data_dir, tmp_path_factory.mktemp("mf") / "cf", model="mf", max_epochs=30, **FAST)


@pytest.fixture(scope="module")
def lightgcn_run(data_dir, tmp_path_factory):
    return _train(data_dir, tmp_path_factory.mktemp("lgcn") / "cf", model="lightgcn", max_epochs=30, **FAST)


@pytest.fixture(scope="module")
def sasrec_run(data_dir, tmp_path_factory):
    return _train(data_dir, tmp_path_factory.mktemp("sas") / "cf", model="sasrec", max_epochs=15, **FAST)


@pytest.fixture(scope="module")
def quick_run(data_dir, tmp_path_factory):
    """One epoch of MF: a complete CF_DIR for the tests of its files, not of what it learned."""
    return _train(data_dir, tmp_path_factory.mktemp("quick") / "cf", model="mf", max_epochs=1, **FAST)


def _test_split_scores_from_tables(cf_dir: Path, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, <user row, item row>) of the test split, from the written embedding tables."""
    users = read_embeddings(cf_dir / "user_embeddings.parquet")
    items = read_embeddings(cf_dir / "item_embeddings.parquet")
    test = pq.read_table(data_dir / "test.parquet")
    u, i = test.column("user").to_numpy(), test.column("item").to_numpy()
    return test.column("label").to_numpy(), (users[u] * items[i]).sum(1)


def check_test_predictions(cf_dir: Path, data_dir: Path) -> pa.Table:
    """test_predictions.parquet has one row per test.parquet row (same order, ids and labels), and
    scikit-learn's AUC of its scores is metrics.json's test AUC. Returns the table."""
    preds = pq.read_table(cf_dir / "test_predictions.parquet")
    assert preds.schema.names == ["sample_id", "user", "item", "label", "score"]
    assert [f.type for f in preds.schema] == [pa.int64(), pa.int32(), pa.int32(), pa.int8(), pa.float32()]
    test = pq.read_table(data_dir / "test.parquet")
    assert preds.num_rows == test.num_rows > 0
    for name in ("sample_id", "user", "item", "label"):
        np.testing.assert_array_equal(preds.column(name).to_numpy(), test.column(name).to_numpy(), err_msg=name)
    labels, scores = preds.column("label").to_numpy(), preds.column("score").to_numpy()
    assert np.isfinite(scores).all() and len(np.unique(scores)) > 1
    test_auc = json.loads((cf_dir / "metrics.json").read_text())["test"]["auc"]
    assert abs(roc_auc_score(labels, scores) - test_auc) < 1e-6, (roc_auc_score(labels, scores), test_auc)
    return preds


# ----------------------------------------------------------------------------- data
def test_pad_histories_matches_a_python_reference():
    rng = np.random.default_rng(1)
    lists = [None if rng.random() < 0.1 else rng.integers(0, 50, rng.integers(0, 12)).tolist() for _ in range(300)]
    arr = pa.chunked_array([pa.array(lists[:100], pa.list_(pa.int32())), pa.array(lists[100:], pa.list_(pa.int32()))])
    got = pad_histories(arr.slice(7), 5)
    for row, lst in zip(got, lists[7:]):
        tail = (lst or [])[-5:]
        assert row.tolist() == [HISTORY_PAD] * (5 - len(tail)) + tail


def test_load_data_aligns_columns_and_cold_mask(data_dir):
    data, manifest = load_data(data_dir, max_history=25)
    test = pq.read_table(data_dir / "test.parquet").to_pydict()
    assert (data.num_users, data.num_items) == (N_USERS, N_ITEMS)
    assert data.test.history.shape == (len(test["user"]), 25)
    row = int(np.argmax([len(h) for h in test["history"]]))
    assert data.test.history[row, -3:].tolist() == test["history"][row][-3:]
    expected_cold = np.array(test["cold_user"]) | np.array(test["cold_item"])
    assert np.array_equal(data.test.cold.numpy(), expected_cold) and expected_cold.any()


# ----------------------------------------------------------------------------- models learn
@pytest.mark.slow
def test_mf_learns_the_planted_preferences(mf_run):
    _, m = mf_run
    assert m["test"]["auc"] >= MF_MIN_AUC, m["test"]
    assert m["valid"]["auc"] >= MF_MIN_AUC and m["test"]["uauc"] > 0.7
    assert m["test"]["warm"]["auc"] > m["test"]["auc"] - 0.05          # warm rows carry the signal
    assert m["test"]["cold"]["n"] > 0


@pytest.mark.slow
def test_lightgcn_learns_the_planted_preferences(lightgcn_run):
    assert lightgcn_run[1]["test"]["auc"] >= OTHER_MIN_AUC, lightgcn_run[1]["test"]


@pytest.mark.slow
def test_sasrec_learns_the_planted_preferences(sasrec_run):
    assert sasrec_run[1]["test"]["auc"] >= OTHER_MIN_AUC, sasrec_run[1]["test"]


# ----------------------------------------------------------------------------- CF_DIR files
@pytest.mark.slow
def test_run_directory_holds_every_file_with_the_right_shapes(mf_run, data_dir):
    cf_dir, m = mf_run
    on_disk = json.loads((cf_dir / "metrics.json").read_text())
    assert on_disk["valid"]["auc"] == m["valid"]["auc"] and set(on_disk["test"]) >= {"auc", "uauc", "warm", "cold"}
    assert 1 <= on_disk["best_epoch"] <= on_disk["epochs_run"] and on_disk["n_train"] > 0
    for name, key, n in (("user_embeddings.parquet", "user", N_USERS), ("item_embeddings.parquet", "item", N_ITEMS)):
        table = pq.read_table(cf_dir / name)
        assert table.schema.field(key).type == pa.int32()
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
        assert table.num_rows == n and table.column(key).to_pylist() == list(range(n))
    meta = json.loads((cf_dir / "cf.json").read_text())
    assert meta["model"] == "mf" and meta["dim"] == DIM and meta["num_users"] == N_USERS
    assert meta["dataset"]["checksums"] == {"train.parquet": "planted"}
    assert len(meta["dataset"]["dataset_json_sha256"]) == 64
    assert set(load_file(str(cf_dir / "model.safetensors"))) == {"user_emb.weight", "item_emb.weight"}
    assert set(meta["files"]) == {"metrics.json", "user_embeddings.parquet", "item_embeddings.parquet",
                                  "model.safetensors", "test_predictions.parquet"}
    assert not list(cf_dir.parent.glob(".cf.*"))                        # no temporary directory left
    # the printed/returned metrics come from metrics.json; the predictions are checked independently
    preds = check_test_predictions(cf_dir, data_dir)
    labels, table_scores = _test_split_scores_from_tables(cf_dir, data_dir)
    np.testing.assert_array_equal(preds.column("label").to_numpy(), labels)
    np.testing.assert_allclose(preds.column("score").to_numpy(), table_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["lightgcn_run", "sasrec_run"])
def test_written_test_predictions_give_the_reported_auc(run, request, data_dir):
    cf_dir, _ = request.getfixturevalue(run)
    preds = check_test_predictions(cf_dir, data_dir)
    assert roc_auc_score(preds.column("label").to_numpy(), preds.column("score").to_numpy()) >= OTHER_MIN_AUC
    if run == "lightgcn_run":                       # SASRec scores use per-row histories, not the table
        _, table_scores = _test_split_scores_from_tables(cf_dir, data_dir)
        np.testing.assert_allclose(preds.column("score").to_numpy(), table_scores, rtol=1e-5, atol=1e-5)


def test_run_without_test_predictions_still_loads(quick_run, data_dir, tmp_path):
    """A CF_DIR written before test_predictions.parquet existed (no file, no sha256 entry) loads."""
    check_test_predictions(quick_run[0], data_dir)
    old = tmp_path / "cf"
    shutil.copytree(quick_run[0], old)
    (old / "test_predictions.parquet").unlink()
    meta = json.loads((old / "cf.json").read_text())
    del meta["files"]["test_predictions.parquet"]
    (old / "cf.json").write_text(json.dumps(meta))
    model, cfg = load_cf(old)
    data, _ = load_data(data_dir)
    scores = pq.read_table(quick_run[0] / "test_predictions.parquet").column("score").to_numpy()
    np.testing.assert_allclose(predict(model, data.test, 4096), scores, rtol=1e-5, atol=1e-5)
    assert cfg.model == "mf"


@pytest.mark.slow
@pytest.mark.parametrize("run", ["mf_run", "lightgcn_run"])
def test_load_cf_reproduces_the_written_tables_and_metrics(run, request, data_dir):
    cf_dir, m = request.getfixturevalue(run)
    model, cfg = load_cf(cf_dir)
    assert cfg.model == m["model"]
    items = read_embeddings(cf_dir / "item_embeddings.parquet")
    torch.testing.assert_close(model.item_vectors().detach(), torch.from_numpy(items))
    labels, scores = _test_split_scores_from_tables(cf_dir, data_dir)
    assert auc(labels, scores) == pytest.approx(m["test"]["auc"], abs=1e-6)
    data, _ = load_data(data_dir)
    np.testing.assert_allclose(predict(model, data.test, 4096), scores, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_load_cf_reproduces_sasrec_user_vectors_from_history(sasrec_run, data_dir):
    cf_dir, m = sasrec_run
    model, cfg = load_cf(cf_dir)
    data, _ = load_data(data_dir, cfg.max_history)
    with torch.no_grad():
        table = model.user_vectors_from_history(sasrec_user_histories(data.train, N_USERS, cfg.max_history))
    torch.testing.assert_close(table, torch.from_numpy(read_embeddings(cf_dir / "user_embeddings.parquet")))
    assert auc(data.test.labels.numpy(), predict(model, data.test, 4096)) == pytest.approx(m["test"]["auc"], abs=1e-6)


def test_load_cf_rejects_a_modified_weights_file(quick_run, tmp_path):
    copy = tmp_path / "cf"
    shutil.copytree(quick_run[0], copy)
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(DatasetError, match="does not match the sha256"):
        load_cf(copy)
    with pytest.raises(DatasetError, match="no cf.json"):
        load_cf(tmp_path)


# ----------------------------------------------------------------------------- SASRec details
def _small_sasrec(seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    return build_model("sasrec", 10, 30, 16, max_history=6, sasrec_heads=2).eval()


def test_sasrec_empty_history_gives_a_finite_vector():
    model = _small_sasrec()
    empty = torch.full((3, 6), HISTORY_PAD)
    with torch.no_grad():
        out = model.user_vectors_from_history(empty)
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    model.train()                                    # also with dropout, and gradients stay finite
    loss = model.score(CFBatch(torch.zeros(3, dtype=torch.long), torch.arange(3), empty)).sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sasrec_last_position_path_equals_the_full_computation():
    model = _small_sasrec()
    hist = torch.tensor([[HISTORY_PAD, HISTORY_PAD, 3, 7, 1, 29], [5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        fast = model.user_vectors_from_history(hist)
        pad = hist < 0
        x = (model.item_emb((hist + 1).clamp(min=0)) * 4.0 + model.pos_emb.weight) * (~pad).unsqueeze(-1)
        for block in model.blocks:
            x = block(x, model._mask(pad), last_only=False)
        full = model.final_norm(x[:, -1])
        short = model.user_vectors_from_history(hist[:1, 2:])     # shorter input: left-padded
        longer = model.user_vectors_from_history(torch.cat([torch.tensor([[4, 4, 4]] * 2), hist], 1))
    torch.testing.assert_close(fast, full)
    torch.testing.assert_close(short, fast[:1])
    torch.testing.assert_close(longer, fast)                     # longer input: the last L kept


def test_sasrec_uses_older_items_and_masks_padding():
    model = _small_sasrec()
    a = torch.tensor([[HISTORY_PAD, 2, 3, 4, 5, 6]])
    b = a.clone()
    b[0, 1] = 9                                       # a different older item changes the vector
    # the same weights with L = 5 see [2..6] without padding: equal iff padding is fully masked
    shorter = build_model("sasrec", 10, 30, 16, max_history=5, sasrec_heads=2).eval()
    state = model.state_dict()
    shorter.load_state_dict({**state, "pos_emb.weight": state["pos_emb.weight"][1:]})
    with torch.no_grad():
        va, vb = model.user_vectors_from_history(a), model.user_vectors_from_history(b)
        unpadded = shorter.user_vectors_from_history(a[:, 1:])
    assert not torch.allclose(va, vb)
    torch.testing.assert_close(unpadded, va)


# ----------------------------------------------------------------------------- training loop
def test_early_stopping_stops_before_max_epochs(data_dir):
    data, _ = load_data(data_dir)
    cfg = CFConfig(model="mf", dim=DIM, lr=0.05, batch_size=256, max_epochs=300, patience=1, min_epochs=1)
    m = fit_cf(data, cfg, progress=False).metrics
    assert m["epochs_run"] < 300 and m["stopped_early"]
    assert m["epochs_run"] == m["best_epoch"] + 1
    assert m["valid"]["auc"] == pytest.approx(max(e["valid_auc"] for e in m["epochs"]), abs=1e-9)


def test_early_stopping_waits_for_min_epochs_and_warns_when_the_first_epoch_stays_best(data_dir, capsys):
    """A flat start (here: a learning rate too small to move anything) does not stop training before
    min_epochs, and a run whose best epoch is the first says so, in metrics and on stderr."""
    data, _ = load_data(data_dir)
    cfg = CFConfig(model="mf", dim=DIM, lr=1e-12, weight_decay=0.0, batch_size=256, max_epochs=30, patience=1,
                   min_epochs=8)
    m = fit_cf(data, cfg, progress=False).metrics
    assert m["best_epoch"] == 1 and m["epochs_run"] == 8 and m["min_epochs"] == 8
    assert len(m["warnings"]) == 1 and "epoch 1" in m["warnings"][0] and "--min-epochs (now 8)" in m["warnings"][0]
    assert m["warnings"][0] in capsys.readouterr().err
    cfg = CFConfig(model="mf", dim=DIM, lr=0.05, batch_size=256, max_epochs=30, patience=1, min_epochs=8)
    m = fit_cf(data, cfg, progress=False).metrics
    assert m["epochs_run"] >= 8 and m["best_epoch"] > 1 and m["warnings"] == []


def test_training_is_reproducible_with_a_seed_and_leaves_global_rng_alone(data_dir):
    data, _ = load_data(data_dir)
    cfg = CFConfig(model="mf", max_epochs=2, **FAST)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = fit_cf(data, cfg, progress=False).metrics
    after = torch.rand(1)
    b = fit_cf(data, cfg, progress=False).metrics
    assert a["valid"]["auc"] == b["valid"]["auc"] and a["epochs"][0]["loss"] == b["epochs"][0]["loss"]
    assert torch.equal(before, after)


# ----------------------------------------------------------------------------- bad input
def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        CFConfig.from_dict({"dim": 0, "lr": -1.0, "sasrec_dropout": 1.5, "patience": 0, "min_epochs": 0})
    assert len(err.value.problems) == 5 and "dim must be a positive integer, got 0" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'dim'") as err:
        CFConfig.from_dict({"model": "svd", "dimm": 8})
    assert "'svd' is not one of the allowed values" in str(err.value)
    with pytest.raises(ConfigError, match="not divisible by sasrec_heads"):
        CFConfig.from_dict({"model": "sasrec", "dim": 30, "sasrec_heads": 4})


def _variant(data_dir: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "data"
    shutil.copytree(data_dir, out)
    edit(out)
    return out


def _rewrite(path: Path, fn) -> None:
    pq.write_table(fn(pq.read_table(path)), path)


def test_missing_manifest_is_reported(tmp_path):
    with pytest.raises(DatasetError, match="no dataset.json"):
        train_cf(tmp_path, tmp_path / "cf", CFConfig(), progress=False)


def test_empty_train_split_is_reported(data_dir, tmp_path):
    bad = _variant(data_dir, tmp_path, lambda d: _rewrite(d / "train.parquet", lambda t: t.slice(0, 0)))
    with pytest.raises(DatasetError, match="train split has no rows"):
        train_cf(bad, tmp_path / "cf", CFConfig(**FAST), progress=False)
    assert not (tmp_path / "cf").exists()


def test_single_class_valid_split_is_reported(data_dir, tmp_path):
    def positives_only(t):
        return t.filter(pa.compute.equal(t.column("label"), 1))
    bad = _variant(data_dir, tmp_path, lambda d: _rewrite(d / "valid.parquet", positives_only))
    with pytest.raises(DatasetError, match=r"valid split has \d+ rows, \d+ positive: AUC needs both"):
        train_cf(bad, tmp_path / "cf", CFConfig(**FAST), progress=False)


def test_ids_outside_the_manifest_range_are_reported(data_dir, tmp_path):
    def shrink(d):
        m = json.loads((d / "dataset.json").read_text())
        (d / "dataset.json").write_text(json.dumps({**m, "num_users": 250}))
    bad = _variant(data_dir, tmp_path, shrink)
    with pytest.raises(DatasetError, match=r"user id 2\d\d is outside 0..249 .*num_users=250"):
        load_data(bad)


def test_out_dir_of_a_different_run_is_refused_unless_overwrite(data_dir, tmp_path):
    out = tmp_path / "cf"
    quick = dict(model="mf", max_epochs=1, **FAST)
    train_cf(data_dir, out, CFConfig(**quick), progress=False)
    train_cf(data_dir, out, CFConfig(**quick), progress=False)          # the same run: replaced
    with pytest.raises(FileExistsError, match="different CF run.*overwrite"):
        train_cf(data_dir, out, CFConfig(**{**quick, "seed": 1}), progress=False)
    train_cf(data_dir, out, CFConfig(**{**quick, "seed": 1}), progress=False, overwrite=True)
    assert json.loads((out / "cf.json").read_text())["config"]["seed"] == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a CF run"):
        train_cf(data_dir, other, CFConfig(**quick), progress=False)
    assert (other / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- CLI
def test_cli_trains_and_prints_the_metrics(data_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="cora")
    cf_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-cf", "--data", str(data_dir), "--out", str(tmp_path / "cf"), "--dim", "8",
                              "--epochs", "2", "--batch-size", "512", "--lr", "0.01", "--no-progress"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "mf" and printed["epochs_run"] == 2 and 0.5 < printed["test"]["auc"] <= 1.0
    assert json.loads((tmp_path / "cf" / "cf.json").read_text())["dim"] == 8


def test_cli_reports_bad_arguments_without_a_traceback(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="cora")
    cf_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-cf", "--data", str(tmp_path), "--out", str(tmp_path / "cf"), "--dim", "0"])
    assert args.func(args) == 2
    assert "dim must be a positive integer, got 0" in capsys.readouterr().err
    args = parser.parse_args(["train-cf", "--data", str(tmp_path), "--out", str(tmp_path / "cf")])
    assert args.func(args) == 2
    assert "no dataset.json" in capsys.readouterr().err
