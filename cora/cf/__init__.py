"""Collaborative-filtering models (MF, LightGCN, SASRec) whose vectors feed CoRA's generator.

    models.py  the three models: logit = <user vector, item vector>
    data.py    a prepared data directory (cora.data.schema) as tensors
    train.py   CFConfig, the training loop with early stopping on valid AUC, train_cf / load_cf
    store.py   the files of a trained run (CF_DIR), written atomically
    cli.py     the ``cora train-cf`` sub-command
"""

from cora.cf.data import CFData, Split, load_data, pad_histories
from cora.cf.models import HISTORY_PAD, MF, CFBatch, CFModel, LightGCN, SASRec, build_model
from cora.cf.store import read_embeddings
from cora.cf.train import CFConfig, FitResult, fit_cf, load_cf, train_cf

__all__ = ["HISTORY_PAD", "CFBatch", "CFModel", "MF", "LightGCN", "SASRec", "build_model", "CFData", "Split",
           "load_data", "pad_histories", "CFConfig", "FitResult", "fit_cf", "train_cf", "load_cf",
           "read_embeddings"]
