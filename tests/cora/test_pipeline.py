"""The synthetic pipeline end to end through the command line: prepare -> train-cf (each model).

The printed metrics are metrics.json; the test AUC is checked independently, recomputed with
scikit-learn from the written test predictions (and, for MF and LightGCN, those predictions from the
written embedding tables).
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from cora.cf import read_embeddings
from cora.cf.train import load_cf
from trainer.cli import main

# planted 4-d factors, 20k interactions; sasrec with a small dimension to keep the test short
MODELS = {"mf": ("--dim", "64"), "lightgcn": ("--dim", "64"), "sasrec": ("--dim", "64", "--batch-size", "512", "--lr", "3e-3", "--epochs", "10")}
FLOOR = {"mf": 0.80, "lightgcn": 0.75, "sasrec": 0.75}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "data"
    assert main(["prepare", "--source", "synthetic", "--out", str(out), "--users", "300", "--items", "200",
                 "--interactions", "20000", "--factors", "4", "--no-progress"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_prepare_then_train_cf_beats_chance(model, data, tmp_path, capsys):
    cf = tmp_path / f"cf-{model}"
    assert main(["train-cf", "--data", str(data), "--model", model, "--out", str(cf), "--no-progress",
                 *MODELS[model]]) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((cf / "metrics.json").read_text())
    assert printed["test"]["auc"] == metrics["test"]["auc"] >= FLOOR[model]
    assert metrics["valid"]["auc"] >= FLOOR[model] and 0.5 < metrics["test"]["uauc"] <= 1.0
    ds = json.loads((data / "dataset.json").read_text())
    users = pq.read_table(cf / "user_embeddings.parquet")
    items = pq.read_table(cf / "item_embeddings.parquet")
    assert users.num_rows == ds["num_users"] and items.num_rows == ds["num_items"]
    dim = int(MODELS[model][1])
    assert items.schema.field("embedding").type.list_size == dim
    # the saved model scores like the written item table says it should
    loaded, cfg = load_cf(cf)
    vectors = np.asarray(items.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(loaded.item_vectors().detach().numpy(), vectors, rtol=1e-5, atol=1e-6)
    assert cfg.model == model
    # the reported test AUC, recomputed from the written predictions of every test row
    preds = pq.read_table(cf / "test_predictions.parquet")
    test = pq.read_table(data / "test.parquet")
    for name in ("sample_id", "label"):
        np.testing.assert_array_equal(preds.column(name).to_numpy(), test.column(name).to_numpy(), err_msg=name)
    labels, scores = preds.column("label").to_numpy(), preds.column("score").to_numpy()
    assert abs(roc_auc_score(labels, scores) - metrics["test"]["auc"]) < 1e-6
    if model != "sasrec":                        # SASRec scores use per-row histories, not the user table
        u, i = preds.column("user").to_numpy(), preds.column("item").to_numpy()
        dots = (read_embeddings(cf / "user_embeddings.parquet")[u] * vectors[i]).sum(1)
        np.testing.assert_allclose(scores, dots, rtol=1e-5, atol=1e-5)
