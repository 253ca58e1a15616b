"""2-rank DeepSpeed ZeRO-3 under Ray Train on the CPU (gloo), fed by InteractionShard actors."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster import runtime
from tests.conftest import TEST_CPUS
from cluster.embeddings import start_embedding_servers
from cluster.interactions import start_interaction_shards
from cora.cf.store import embedding_table
from cora.config import from_dict
from trainer.cli import main
from trainer.config import TrainConfig
from trainer.hooks import Hooks, Report
from trainer.recipe import Handover

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


class HashPartitions(Hooks):
    """The sha256 of each rank's ZeRO-3 partitions (``ds_tensor``) of the frozen LLM and of the generator,
    after set-up and at the end, written to OUT/rank<r>-<stage>.json (the worker keeps no copy of its own)."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)

    def after_setup(self, recipe) -> None:
        self.write("setup", recipe)

    def at_end(self, recipe) -> None:
        self.write("end", recipe)

    def write(self, stage: str, recipe) -> None:
        def digest(params) -> str:
            h = hashlib.sha256()
            for p in params:
                h.update(p.ds_tensor.detach().contiguous().numpy().tobytes())
            return h.hexdigest()
        frozen = [p for p in recipe.model.llm.parameters() if not p.requires_grad]
        out = {"llm": digest(frozen), "generator": digest(recipe.model.generator.parameters()),
               "llm_elements_held": sum(p.ds_tensor.numel() for p in frozen)}
        Path(self.out_dir, f"rank{recipe.rank}-{stage}.json").write_text(json.dumps(out))


class CountDownProjections(Hooks):
    """After every step: how many shared down projections (dropout(x) @ A) have run so far, and whether any
    is still held; written to OUT/rank<r>.json."""

    def __init__(self, out_dir):
        self.out_dir, self.log = str(out_dir), []

    def after_step(self, recipe, record, batch) -> None:
        groups = recipe.model.injection.groups
        self.log.append({"step": record["step"], "epoch": record["epoch"], "groups": len(groups),
                         "computed": sum(g.computed for g in groups),
                         "held": sum(g.z is not None for g in groups)})

    def at_end(self, recipe) -> None:
        Path(self.out_dir, f"rank{recipe.rank}.json").write_text(json.dumps(self.log))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    from trainer.worker import run
    tmp = tmp_path_factory.mktemp("zero3")
    assert main(["prepare", "--source", "synthetic", "--out", str(tmp / "data"), "--users", str(USERS),
                 "--items", str(ITEMS), "--interactions", "1000", "--factors", str(FACTORS), "--noise", "0.1",
                 "--samples-per-shard", "60", "--no-progress"]) == 0
    planted_tables(tmp / "data", tmp / "cf")
    runtime.init(num_cpus=TEST_CPUS)
    client = start_embedding_servers(str(tmp / "cf"), shards=1, dim=FACTORS, num_cpus=0.1)
    actors = {split: start_interaction_shards(str(tmp / "data"), split, 2, embeddings=client, batch_size=8, seed=0,
                                              num_cpus=0.1, max_length=256) for split in ("train", "valid", "test")}
    (tmp / "report").mkdir()
    (tmp / "hashes").mkdir()
    (tmp / "down").mkdir()
    cfg = from_dict(TrainConfig, {
        "llm": {"name": "tiny-llama"}, "run": {"epochs": 2, "workers": 2, "eval_baseline": False},
        "generator": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64},
        "optim": {"warmup_steps": 0, "lr_peak": 1e-2, "lr_end": 1e-3}})
    handover = Handover(train=actors["train"], valid=actors["valid"], test=actors["test"], cf_dim=FACTORS,
                        total_steps=100, run_dir=str(tmp / "run"),
                        hooks=[Report(tmp / "report"), HashPartitions(tmp / "hashes"),
                               CountDownProjections(tmp / "down")])
    run(cfg, handover, storage_path=str(tmp / "runs"))
    ranks = [json.loads((tmp / "report" / f"rank{r}.json").read_text()) for r in (0, 1)]
    train_ids = pq.read_table(tmp / "data" / "train.parquet").column("sample_id").to_pylist()
    return ranks, train_ids, tmp, actors


def test_each_rank_holds_half_of_the_llm_and_it_never_changes(two_rank_run):
    ranks, _, tmp, _ = two_rank_run
    hashes = {(r, s): json.loads((tmp / "hashes" / f"rank{r}-{s}.json").read_text()) for r in (0, 1)
              for s in ("setup", "end")}
    for rank, r in enumerate(ranks):
        part = r["llm_partition"]
        assert part["total"] > 3_000_000 and abs(part["share"] - 0.5) < 0.01     # from ds_tensor sizes
        assert hashes[rank, "setup"]["llm_elements_held"] == part["held"]
        assert hashes[rank, "end"]["llm"] == hashes[rank, "setup"]["llm"]             # bit-identical
        assert hashes[rank, "end"]["generator"] != hashes[rank, "setup"]["generator"]  # trained
    assert hashes[0, "setup"]["llm"] != hashes[1, "setup"]["llm"]                   # two different halves


def test_q_k_v_share_one_down_projection_per_layer_under_zero3_and_nothing_stays_cached(two_rank_run):
    """ZeRO-3's hooks hand q, k and v new tensor objects for the same hidden state: the sharing must not
    depend on identity. Between two steps of an epoch exactly one down projection per group and layer ran
    (one training forward), and after each step none is held."""
    tmp = two_rank_run[2]
    for r in (0, 1):
        log = json.loads((tmp / "down" / f"rank{r}.json").read_text())
        groups = log[0]["groups"]
        assert groups == 2 * 2                   # tiny-llama: 2 layers x ({q, k, v}, {o})
        deltas = [b["computed"] - a["computed"] for a, b in zip(log, log[1:]) if a["epoch"] == b["epoch"]]
        assert len(deltas) > 50 and set(deltas) == {groups}
        assert all(rec["held"] == 0 for rec in log)


def test_training_is_finite_falls_and_sees_each_sample_once_per_epoch(two_rank_run):
    ranks, train_ids = two_rank_run[:2]
    for r in ranks:
        assert all(step["finite"] for step in r["log"])
        losses = [step["loss"] for step in r["log"]]
        assert np.isfinite(losses).all() and np.mean(losses[-20:]) < np.mean(losses[:10])
    for epoch in (0, 1):
        seen = [i for r in ranks for step in r["log"] if step["epoch"] == epoch for i in step["sample_ids"]]
        assert sorted(seen) == sorted(train_ids)


@pytest.mark.parametrize("checkpointing,partitioning,leaf_layers,stage", [
    (False, "zero3", False, 3), (True, "zero3", False, 3), (False, "replicated", False, 2),
    (False, "replicated", True, 3), (True, "zero3", True, 3), (False, "hpz", False, 3)],
    ids=["plain", "activation_checkpointing", "replicated_base_stage2", "replicated_stage3_leaf_layers",
         "activation_checkpointing_leaf_layers", "hpz_secondary_partition"])
def test_two_rank_losses_match_a_one_process_run_on_the_same_samples(tmp_path, checkpointing, partitioning,
                                                                     leaf_layers, stage):
    """Same seed, same samples: rank 0's and rank 1's k-th batches together are the k-th batch of a
    plain single-process run (no DeepSpeed), which must give the same loss step after step; also with
    the LLM's activations recomputed in backward (the per-sample path must recompute identically), with
    the frozen LLM replicated (whole on each rank, the generator and P data-parallel under ZeRO stage 2,
    its default, or ZeRO-3), with ZeRO-3 hooking whole decoder layers (engine.leaf_layers: a layer's P
    released before its backward used it would show here), and under hpz (its secondary partition spans
    the node's 2 ranks: from the second step on every gather of the base reads it)."""
    import torch
    from torch import nn

    from cora.generator import GeneratorConfig
    from cora.injection import InjectionConfig
    from cora.llm import LLMConfig, load_llm, resolve_answer_token
    from cora.optim import OptimConfig, build_optimizer
    from cora.scoring import CoRAModel, collate
    from trainer.worker import run
    assert main(["prepare", "--source", "synthetic", "--out", str(tmp_path / "data"), "--users", str(USERS),
                 "--items", str(ITEMS), "--interactions", "400", "--factors", str(FACTORS),
                 "--samples-per-shard", "60", "--no-progress"]) == 0
    planted_tables(tmp_path / "data", tmp_path / "cf")
    runtime.init(num_cpus=TEST_CPUS)
    client = start_embedding_servers(str(tmp_path / "cf"), shards=1, dim=FACTORS, num_cpus=0.1)
    actors = start_interaction_shards(str(tmp_path / "data"), "train", 2, embeddings=client, batch_size=4,
                                      seed=1, num_cpus=0.1, max_length=256)
    (tmp_path / "report").mkdir()
    steps = 5
    gen = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "dropout": 0.0}
    optim = {"warmup_steps": 2, "lr_peak": 1e-2, "lr_start": 1e-3, "lr_end": 1e-3}
    cfg = from_dict(TrainConfig, {
        "llm": {"name": "tiny-llama"}, "run": {"max_steps": steps, "seed": 3, "workers": 2},
        "generator": gen, "optim": optim, "injection": {"dropout": 0.0},
        "engine": {"activation_checkpointing": checkpointing, "partitioning": partitioning,
                   "leaf_layers": leaf_layers, "zero_stage": "auto" if stage == 2 else stage}})
    handover = Handover(train=actors, cf_dim=FACTORS, total_steps=steps,
                        hooks=[Report(tmp_path / "report", record_batches=steps)])
    run(cfg, handover, storage_path=str(tmp_path / "runs"))
    reports = [json.loads((tmp_path / "report" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["activation_checkpointing"] is checkpointing for r in reports)
    assert all(r["zero_stage"] == stage for r in reports)
    layers = [f"llm.model.layers.{i}" for i in range(2)] if leaf_layers else []
    leaves = ["generator.qformer"] + layers if stage == 3 else []      # stage 2 hooks no module
    assert all(sorted(r["zero3_leaves"]) == leaves for r in reports)   # each hooked as one
    for r in reports:                     # the frozen LLM's elements this rank holds: half of it, or all of it
        part = r["llm_partition"]
        assert part["total"] == 3_219_776 and part["share"] == pytest.approx(1.0 if partitioning == "replicated"
                                                                              else 0.5, abs=0.01)
        # hpz: a secondary partition of every frozen weight over the node's 2 ranks (half of it: the LM head,
        # tied to the embedding, is one tensor); none otherwise
        assert part["secondary"] == (pytest.approx(3_219_776 / 2, rel=0.01) if partitioning == "hpz" else 0)
    ranks = [r["log"] for r in reports]

    torch.manual_seed(3)                                       # the reference: one process, batch 8
    llm, tok = load_llm(LLMConfig(name="tiny-llama"))          # the preset as any process builds it
    model = CoRAModel(llm, resolve_answer_token(tok), FACTORS, FACTORS, InjectionConfig(dropout=0.0),
                      GeneratorConfig(**gen)).train()
    opt, sched = build_optimizer(model.trainable_parameters(), OptimConfig(**optim), steps)
    for k in range(steps):
        parts = [ranks[r][k]["batch"] for r in (0, 1)]
        prompts = [row[:n] for p in parts for row, n in zip(p["input_ids"], p["lengths"])]
        batch = collate(prompts, sum((p["user_emb"] for p in parts), []), sum((p["item_emb"] for p in parts), []),
                        sum((p["labels"] for p in parts), []), tok.pad_token_id)
        opt.zero_grad()
        loss, _ = model.loss(batch)
        loss.backward()
        nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
        opt.step()
        sched.step()
        distributed = (ranks[0][k]["loss"] + ranks[1][k]["loss"]) / 2
        assert abs(distributed - loss.item()) < 1e-4 * max(1.0, abs(loss.item())), (k, distributed, loss.item())


def test_validation_metrics_and_the_export_scores_like_the_distributed_model(two_rank_run):
    import torch

    from cluster.client import BatchIterator
    from cora.export import load_exported
    from cora.scoring import Batch
    _, _, tmp, actors = two_rank_run
    m = json.loads((tmp / "run" / "metrics.json").read_text())
    assert [e["epoch"] for e in m["evaluations"]] == [0, 1]
    assert 0.0 <= m["valid"]["auc"] <= 1.0 and m["valid"]["auc"] == max(e["valid_auc"] for e in m["evaluations"])
    test_rows = pq.read_table(tmp / "data" / "test.parquet").num_rows
    assert m["test"]["n"] == test_rows and {"warm", "cold"} <= set(m["test"])
    preds = pq.read_table(tmp / "run" / "test_predictions.parquet").to_pandas().set_index("sample_ids")
    assert len(preds) == test_rows
    # the exported adapter, in one process without DeepSpeed, scores the test samples the same way
    model, _ = load_exported(tmp / "run" / "export")
    got = {}
    with torch.no_grad():
        for r in (0, 1):
            for raw in BatchIterator(actors["test"][r], epoch=0):
                for sid, score, w in zip(raw["sample_ids"], model(Batch.from_arrays(raw)).numpy(), raw["weights"]):
                    if w > 0:
                        got[int(sid)] = float(score)
    assert sorted(got) == sorted(preds.index)
    np.testing.assert_allclose([got[i] for i in preds.index], preds["scores"].to_numpy(), rtol=1e-4, atol=1e-4)
