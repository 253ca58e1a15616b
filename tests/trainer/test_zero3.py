"""2-rank DeepSpeed ZeRO-3 under Ray Train on the CPU (gloo), fed by InteractionShard actors."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster import runtime
from cluster.embeddings import start_embedding_servers
from cluster.interactions import start_interaction_shards
from cora.cf.store import embedding_table
from cora.cli import main

pytestmark = pytest.mark.slow
USERS, ITEMS, FACTORS = 60, 40, 2


def planted_tables(data, out):
    """The planted factors of `cora prepare --source synthetic --seed 0` as CF tables (dense-id order)."""
    out.mkdir()
    rng = np.random.default_rng(0)                       # drawn exactly as prepare draws them
    uf, vf = rng.standard_normal((USERS, FACTORS)), rng.standard_normal((ITEMS, FACTORS))
    users = [int(r[1:]) for r in pq.read_table(data / "users.parquet").column("raw_id").to_pylist()]
    items = [int(r[1:]) for r in pq.read_table(data / "items.parquet").column("raw_id").to_pylist()]
    pq.write_table(embedding_table("user", uf[users]), out / "user_embeddings.parquet")
    pq.write_table(embedding_table("item", vf[items]), out / "item_embeddings.parquet")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    from trainer.worker import run
    tmp = tmp_path_factory.mktemp("zero3")
    assert main(["prepare", "--source", "synthetic", "--out", str(tmp / "data"), "--users", str(USERS),
                 "--items", str(ITEMS), "--interactions", "1000", "--factors", str(FACTORS), "--noise", "0.1",
                 "--samples-per-shard", "60", "--no-progress"]) == 0
    planted_tables(tmp / "data", tmp / "cf")
    runtime.init(num_cpus=4)
    client = start_embedding_servers(str(tmp / "cf"), shards=1, dim=FACTORS, num_cpus=0.1)
    actors = start_interaction_shards(str(tmp / "data"), "train", 2, embeddings=client, batch_size=8, seed=0,
                                      num_cpus=0.1, max_length=256)
    (tmp / "report").mkdir()
    cfg = {"llm": {"name": "tiny-llama"}, "cf_dim": FACTORS, "actors": actors, "epochs": 2,
           "report_dir": str(tmp / "report"), "total_steps": 100,
           "generator": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64},
           "optim": {"warmup_steps": 0, "lr_peak": 1e-2, "lr_end": 1e-3}}
    run(cfg, num_workers=2, storage_path=str(tmp / "runs"))
    ranks = [json.loads((tmp / "report" / f"rank{r}.json").read_text()) for r in (0, 1)]
    train_ids = pq.read_table(tmp / "data" / "train.parquet").column("sample_id").to_pylist()
    return ranks, train_ids


def test_each_rank_holds_half_of_the_llm_and_it_never_changes(two_rank_run):
    ranks, _ = two_rank_run
    for r in ranks:
        part = r["llm_partition"]
        assert part["total"] > 3_000_000 and abs(part["share"] - 0.5) < 0.01     # from ds_tensor sizes
        assert r["llm_unchanged"] is True                                          # bit-identical
        assert r["generator_changed"] is True


def test_training_is_finite_falls_and_sees_each_sample_once_per_epoch(two_rank_run):
    ranks, train_ids = two_rank_run
    for r in ranks:
        assert all(step["finite"] for step in r["log"])
        losses = [step["loss"] for step in r["log"]]
        assert np.isfinite(losses).all() and np.mean(losses[-20:]) < np.mean(losses[:10])
    for epoch in (0, 1):
        seen = [i for r in ranks for step in r["log"] if step["epoch"] == epoch for i in step["sample_ids"]]
        assert sorted(seen) == sorted(train_ids)
