"""Exact resume and fault tolerance of `cora train` (2 ranks on the CPU, local Ray; ZeRO-3, or stage 2 over a
replicated base): a run whose worker is killed mid-epoch resumes from its newest committed checkpoint (on moto's S3
server) and trains on exactly the samples, with exactly the losses, of an uninterrupted run."""

import json

import pytest
import torch

from cluster import runtime
from trainer.cli import main
from tests.conftest import TEST_CPUS
from cora.fileio import open_fs

from .runs import Killer, final, steps

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    runtime.init(num_cpus=TEST_CPUS)
    tmp = tmp_path_factory.mktemp("resume")
    assert main(["prepare", "--source", "synthetic", "--out", str(tmp / "data"), "--users", "60", "--items", "40",
                 "--interactions", "700", "--samples-per-shard", "50", "--rule", "additive", "--no-progress"]) == 0
    assert main(["train-cf", "--data", str(tmp / "data"), "--model", "mf", "--out", str(tmp / "cf"), "--dim", "8",
                 "--epochs", "3", "--no-progress"]) == 0
    return tmp


def args(inputs, run, *extra):
    return ["train", "--config", "configs/demo.yaml", f"data.data_dir={inputs / 'data'}",
            f"data.cf_dir={inputs / 'cf'}", f"run.run_dir={run}", "run.epochs=1", "run.dashboard=false",
            "run.eval_baseline=false", "run.sample_log=true", "engine.micro_batch_size=4", "run.checkpoint_every=4",
            *extra]


def test_killed_then_resumed_from_s3_equals_an_uninterrupted_run(inputs, tmp_path, s3_server, capsys):
    """With a replicated base (engine.partitioning=replicated): the frozen LLM whole on each rank, the generator
    and P under ZeRO stage 2, each flat parameter group cut into 2 partitions (a tensor possibly across both),
    from which the checkpoint is assembled and into which it is loaded back. The other kill tests below run
    ZeRO-3 (the default partitioning)."""
    fs, _ = open_fs("s3://ckpts", create_buckets=True)
    fs.create_dir("ckpts")
    budget = ("run.max_steps=24", "engine.partitioning=replicated")
    ref = tmp_path / "reference"
    assert main(args(inputs, ref, *budget)) == 0
    run, uri = tmp_path / "run", "s3://ckpts/run"
    killer = Killer(uri, after_step=8)
    capsys.readouterr()
    # max_failures=0: the killed run fails ...
    assert main(args(inputs, run, *budget, f"run.checkpoint_uri={uri}", "run.max_failures=0")) == 1
    err = capsys.readouterr().err
    assert "the worker group failed (run.max_failures=0" in err and f"checkpoints stay in {uri}" in err
    assert "run.resume=auto" in err
    assert killer.killed_at is not None
    interrupted = steps(run)
    assert max(interrupted) < 24                   # ... mid-epoch (an epoch has 100 steps), before its budget
    assert main(args(inputs, run, *budget, f"run.checkpoint_uri={uri}", "run.resume=auto")) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["partitioning"], metrics["zero_stage"]) == ("replicated", 2)
    resumed = int(metrics["resumed_from"].split("-")[1])
    assert 8 <= resumed < 24 and metrics["steps"] == 24
    want, got = final(ref), final(run)
    assert sorted(got) == sorted(want)             # the same steps on both ranks, none skipped
    for key in want:                               # the same samples, in the same order, with the same loss
        assert got[key]["sample_ids"] == want[key]["sample_ids"], key
        assert abs(got[key]["loss"] - want[key]["loss"]) < 1e-5, (key, got[key]["loss"], want[key]["loss"])
    # the steps after the checkpoint that the killed run had trained were trained again, once
    redone = [s for s, recs in steps(run).items() if len(recs) > 2]
    assert all(s > resumed for s in redone)


def test_tallrec_with_accumulation_2_restarted_after_a_kill_trains_each_sample_once(inputs, tmp_path, capsys):
    """The TALLRec baseline (method=tallrec: LoRA, no CF input) with 2 micro-batches per optimiser step, its worker
    killed mid-epoch and restarted by Ray Train: steps, checkpoints and TensorBoard count optimiser steps,
    checkpoints fall on window ends, the epoch's samples are each trained once, the export is scored alike
    by `cora eval`, and a resume with a changed optim.lr_peak follows the new schedule exactly."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cora.optim import OptimConfig, lr_at
    from trainer.checkpoint import latest_committed, list_checkpoints, read_commit
    run = tmp_path / "run"
    lora = ("method=tallrec", "engine.gradient_accumulation=2")
    # the kill follows the first commit, as in the other kill tests: the whole epoch is 35 short steps, and a
    # later commit can land after the last of them (the kill then finds a finished run: a CI run of 85a4434)
    killer = Killer(str(run / "checkpoints"), after_step=3)
    assert main(args(inputs, run, *lora, "run.max_failures=1", "run.checkpoint_every=3")) == 0
    assert killer.killed_at is not None
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from"] is not None, "the kill came after the run had finished"
    resumed = int(metrics["resumed_from"].split("-")[1])
    assert resumed >= 3 and resumed % 3 == 0
    import pyarrow.parquet as pq
    train_ids = pq.read_table(inputs / "data" / "train.parquet").column("sample_id").to_pylist()
    done = final(run)
    trained = [i for rec in done.values() for i in rec["sample_ids"]]
    assert sorted(trained) == sorted(train_ids)      # the whole epoch, each sample once
    assert max(m for _, _, m in done) + 1 == 2
    micro_batches = -(-(-(-len(train_ids) // 2)) // 4)              # per rank: ceil(ceil(N / 2) / 4)
    assert metrics["steps"] == max(s for s, _, _ in done) == -(-micro_batches // 2)
    # the checkpoints' counters: optimiser steps (every 3, and the epoch's end), 2 micro-batches each
    uri = str(run / "checkpoints")
    kept = [read_commit(uri, n)["step"] for n in list_checkpoints(uri)]
    assert kept and all(s % 3 == 0 or s == metrics["steps"] for s in kept)
    state = json.loads(latest_committed(uri)[2]["state.json"])
    assert state["global_steps"] == metrics["steps"] and state["micro_steps"] == 2 * metrics["steps"]
    board = EventAccumulator(str(run / "tensorboard")).Reload()
    logged = sorted({e.step for e in board.Scalars("train/loss")})
    assert logged == list(range(1, metrics["steps"] + 1))       # one point per optimiser step
    # the exported LoRA adapter, in one process, scores the test split as the trainer did
    eval_reproduces_test_auc(run, metrics, capsys)
    # resume the finished run for 3 more steps of a second epoch with another peak: the new schedule applies
    total = 2 * metrics["steps"]
    before = {s: rec["lr"] for (s, r, m), rec in done.items()}
    assert main(args(inputs, run, *lora, "run.resume=auto", "run.epochs=2", f"run.max_steps={metrics['steps'] + 3}",
                     "optim.lr_peak=3e-3")) == 0
    after = {s: rec["lr"] for (s, r, m), rec in final(run).items() if s > metrics["steps"]}
    assert sorted(after) == [metrics["steps"] + k for k in (1, 2, 3)]
    new = OptimConfig(warmup_steps=20, lr_peak=3e-3, lr_end=1e-4)
    for s, lr in after.items():
        assert lr == pytest.approx(lr_at(s - 1, total, new), rel=1e-6), (s, lr)
    old = OptimConfig(warmup_steps=20, lr_peak=1e-3, lr_end=1e-4)
    for s, lr in before.items():
        assert lr == pytest.approx(lr_at(s - 1, metrics["steps"], old), rel=1e-6), (s, lr)


def killed_like_uninterrupted(inputs, tmp_path, *extra, steps=12, after_step=4) -> tuple[dict, object, object]:
    """A reference run of ``steps`` steps and the same run with a worker killed once a checkpoint at or after
    ``after_step`` is committed and restarted by Ray Train; asserts that they trained the same samples with
    the same losses. Returns (the restarted run's metrics, its RUN, the reference's RUN)."""
    budget = (*extra, f"run.max_steps={steps}")
    ref, run = tmp_path / "reference", tmp_path / "run"
    assert main(args(inputs, ref, *budget)) == 0
    killer = Killer(str(run / "checkpoints"), after_step=after_step)
    assert main(args(inputs, run, *budget, "run.max_failures=1")) == 0
    assert killer.killed_at is not None
    metrics = json.loads((run / "metrics.json").read_text())
    assert after_step <= int(metrics["resumed_from"].split("-")[1]) < steps and metrics["steps"] == steps
    want, got = final(ref), final(run)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key]["sample_ids"] == want[key]["sample_ids"], key
        assert abs(got[key]["loss"] - want[key]["loss"]) < 1e-5, (key, got[key]["loss"], want[key]["loss"])
    return metrics, run, ref


def eval_reproduces_test_auc(run, metrics, capsys) -> None:
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert abs(again["auc"] - metrics["test"]["auc"]) < 1e-4, (again["auc"], metrics["test"]["auc"])


def test_collm_from_a_tallrec_export_restarted_after_a_kill_trains_exactly_like_an_uninterrupted_run(inputs, tmp_path,
                                                                                                     capsys):
    """CoLLM (method=collm) on 2 ZeRO-3 ranks: its first stage's LoRA (a TALLRec export) is loaded on every
    start, before the restore, and stays frozen; a worker killed mid-epoch and restarted by Ray Train trains the
    same samples with the same losses as an uninterrupted run; the export carries the LoRA and the mapping,
    and `cora eval` scores the test split with it as the trainer did."""
    from safetensors.torch import load_file

    from tests.conftest import write_tallrec_export
    lora = write_tallrec_export(tmp_path / "tallrec")
    collm = ("method=collm", f"collm.lora_from={tmp_path / 'tallrec'}")
    metrics, run, ref = killed_like_uninterrupted(inputs, tmp_path, *collm)
    exported = load_file(str(run / "export" / "adapter.safetensors"))
    mapper = {n: t for n, t in exported.items() if n.startswith("mapper.")}
    assert set(exported) == set(lora) | set(mapper) and mapper
    assert all(torch.equal(exported[n], t) for n, t in lora.items())          # frozen through training
    assert metrics["method"] == "collm" and metrics["trainable_parameters"] == sum(t.numel() for t in mapper.values())
    assert metrics["samples"] > 0 and metrics["samples_per_second"] > 0
    saved = json.loads((run / "export" / "config.json").read_text())
    assert saved["method"] == "collm" and saved["collm"]["lora_from"] is None   # the export stands alone
    eval_reproduces_test_auc(run, metrics, capsys)


def test_reccocktail_merge_restarted_after_a_kill_trains_exactly_like_an_uninterrupted_run(inputs, tmp_path, capsys):
    """RecCocktail's merge (method=reccocktail, the authors' per-module form) on 2 ZeRO-3 ranks: both TALLRec
    LoRAs loaded on every start and frozen, only the merge weights train (on the answer token's entropy, no
    label read); a killed and restarted run trains like an uninterrupted one; the export carries both LoRAs
    and the weights, and `cora eval` scores the test split with it as the trainer did."""
    from safetensors.torch import load_file

    from tests.conftest import write_tallrec_export
    base, ingredient = write_tallrec_export(tmp_path / "base", seed=1), write_tallrec_export(tmp_path / "ingr", seed=2)
    cocktail = ("method=reccocktail", "reccocktail.form=code", f"reccocktail.base_from={tmp_path / 'base'}",
                f"reccocktail.ingredient_from={tmp_path / 'ingr'}", "optim.lr_peak=0.05")
    metrics, run, ref = killed_like_uninterrupted(inputs, tmp_path, *cocktail)
    exported = load_file(str(run / "export" / "adapter.safetensors"))
    assert set(exported) == set(base) | {"merger.logits"}
    for name, t in base.items():                           # both LoRAs frozen, stacked [base, ingredient]
        assert torch.equal(exported[name][0], t) and torch.equal(exported[name][1], ingredient[name]), name
    logits = exported["merger.logits"]
    assert logits.shape[1] == 2 and logits.abs().sum() > 0   # the weights moved from (1/2, 1/2)
    assert metrics["trainable_parameters"] == logits.numel()
    eval_reproduces_test_auc(run, metrics, capsys)


def test_laser_restarted_after_a_kill_trains_exactly_like_an_uninterrupted_run(inputs, tmp_path, capsys):
    """Laser (method=laser: M-Former prefix, suffix token, cosine against item encodings) on 2 ZeRO-3 ranks: the
    item table is encoded by both ranks and kept in checkpoints, so a worker killed mid-epoch and restarted
    trains the same samples with the same losses as an uninterrupted run; the export carries the table, and
    `cora eval` scores the test split with it as the trainer did."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file
    laser = ("method=laser", "laser.experts=2", "laser.queries=2", "laser.blocks=2", "laser.hidden_size=16",
             "laser.heads=2", "laser.history=5")
    metrics, run, ref = killed_like_uninterrupted(inputs, tmp_path, *laser)
    exported = load_file(str(run / "export" / "adapter.safetensors"))
    n_items = len(pq.read_table(inputs / "data" / "items.parquet"))
    assert exported["item_table"].shape[0] == n_items and exported["item_table"].abs().sum() > 0
    assert {n.split(".")[0] for n in exported} == {"mformer", "suffix", "item_table"}
    assert torch.equal(exported["item_table"], load_file(str(ref / "export" / "adapter.safetensors"))["item_table"])
    eval_reproduces_test_auc(run, metrics, capsys)
    assert main(["eval", "--run", str(run), "--checkpoint", "best", "--no-progress"]) == 0   # the table from state::
    assert abs(json.loads(capsys.readouterr().out)["auc"] - metrics["test"]["auc"]) < 1e-4


def test_bdlm_with_its_domain_phase_restarted_after_a_kill_trains_exactly_like_an_uninterrupted_run(inputs, tmp_path,
                                                                                                   capsys):
    """BDLM (method=bdlm) on 2 ZeRO-3 ranks with its shared store (Ray actors, 2 shards per table): the first
    epoch (18 steps) ends with the domain phase (LightGCN on the store, towards the LLM's recorded scores), whose
    teacher the LLM's mutual term then reads. A worker killed mid-epoch 0 and restarted by Ray Train resumes
    the store from the checkpoint (tables, optimiser state, records), so it trains the same samples with the
    same losses, before and after the domain phase, and ends with the same store as the uninterrupted run; the
    export (projection + tables) is scored alike by `cora eval`."""
    from safetensors.torch import load_file
    bdlm = ("method=bdlm", "engine.micro_batch_size=16", "run.epochs=2", "bdlm.store_shards=2", "bdlm.store_lr=0.01",
            "bdlm.mutual_weight=0.5", "bdlm.domain_lr=0.01")
    metrics, run, ref = killed_like_uninterrupted(inputs, tmp_path, *bdlm, steps=20, after_step=4)
    assert int(metrics["resumed_from"].split("-")[1]) < 18           # the domain phase ran after the restart
    assert [e["epoch"] for e in metrics["domain_evaluations"]] == [0]
    want = json.loads((ref / "metrics.json").read_text())
    assert metrics["domain_test"] == want["domain_test"] and 0 < metrics["domain_test"]["auc"] < 1
    assert metrics["trainable_parameters"] == 8 * 64 + 64             # proj: Linear(8 -> d_model 64)
    got, exp = (load_file(str(r / "export" / "adapter.safetensors")) for r in (run, ref))
    assert set(got) == {"bdlm_proj.weight", "bdlm_proj.bias", "store_user", "store_item"}
    assert all(torch.equal(got[k], exp[k]) for k in got)               # the same store, bit for bit
    cf = load_file(str(inputs / "cf" / "model.safetensors"))
    assert not torch.equal(got["store_user"], cf["user_emb.weight"])    # the store was trained
    eval_reproduces_test_auc(run, metrics, capsys)
    assert main(["eval", "--run", str(run), "--checkpoint", "best", "--no-progress"]) == 0   # the tables from state::
    assert abs(json.loads(capsys.readouterr().out)["auc"] - metrics["test"]["auc"]) < 1e-4
