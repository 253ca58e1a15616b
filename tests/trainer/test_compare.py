"""`cora compare`: the --methods checks, the table writer, the resume decision per method, the baselines
without a run of their own (mf, no-injection), and one end-to-end comparison run twice (the second reuses
every run)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from cora.cf.store import read_embeddings
from cora.data.schema import DatasetError
from cora.metrics import ranking
from trainer.cli import main
from trainer.compare import (CompareError, cf_metrics, decide, no_injection, parse_methods, plan, resolve, run_order,
                             side_metrics)
from trainer.compare_report import columns, plot, row, write_csv, write_markdown
from trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
AVAILABLE = "available: mf, no-injection, tallrec, collm, cora"
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- --methods

@pytest.mark.parametrize("methods, says", [
    ("", "--methods is empty"),
    ("mf,,cora", "has an empty name (a stray comma)"),
    ("mf,cora,mf", "given more than once: mf"),
    ("mf,corra", "unknown method 'corra' (did you mean 'cora'?)"),
    ("mf,lightgcn", "unknown method 'lightgcn'"),
])
def test_bad_method_lists_are_refused_with_what_is_available(methods, says, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--config", "configs/demo.yaml", "--methods", methods, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert says in err and AVAILABLE in err and err.startswith("cora compare: error: --methods")
    assert not out.exists()


@pytest.mark.parametrize("methods, says", [
    ("cora,collm", "collm is trained from TALLRec's stage (collm.lora_from=OUT_DIR/tallrec/export): add tallrec"),
    ("mf,no-injection", "no-injection is scored by an LLM run (cora or tallrec) before its first step"),
])
def test_methods_that_need_another_one_are_refused_without_it(methods, says, tmp_path, capsys):
    assert main(["compare", "--config", "configs/demo.yaml", "--methods", methods, "--out", str(tmp_path / "o")]) == 2
    assert says in capsys.readouterr().err


def test_tallrec_is_trained_before_collm_and_rows_keep_the_given_order():
    methods = parse_methods(" cora, collm,mf ,tallrec,no-injection")
    assert methods == ["cora", "collm", "mf", "tallrec", "no-injection"]
    assert run_order(methods) == ["cora", "tallrec", "collm"]
    assert run_order(["tallrec", "cora", "collm"]) == ["tallrec", "cora", "collm"]
    assert run_order(["mf", "no-injection"]) == []


def test_overrides_of_what_compare_sets_per_method_are_refused(tmp_path, capsys):
    assert main(["compare", "--config", "configs/demo.yaml", "--methods", "mf,cora", "--out", str(tmp_path / "o"),
                 "run.max_steps=4", "method=tallrec", "run.run_dir=/tmp/x"]) == 2
    err = capsys.readouterr().err
    assert "override(s) of method, run.run_dir: cora compare sets these for each method" in err


def test_no_injection_without_the_baseline_evaluation_is_refused(tmp_path, capsys):
    assert main(["compare", "--config", "configs/demo.yaml", "--methods", "no-injection,cora", "--out",
                 str(tmp_path / "o"), "run.eval_baseline=false"]) == 2
    assert "run.eval_baseline=false turns off" in capsys.readouterr().err


# ---------------------------------------------------------------- the table

def _test(auc, n=80, warm=None, cold=None):
    out = {"auc": auc, "uauc": auc - 0.1 if auc is not None else None, "n": n}
    if warm is not None:
        out["warm"] = {"auc": warm, "uauc": warm - 0.1, "n": n - 10}
    if cold is not None:
        out["cold"] = {"auc": cold, "uauc": None, "n": 10}
    return out


def _read_md_table(path):
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return split[0], split[2:]


def test_the_csv_and_the_markdown_hold_the_same_table_with_empty_cells_for_what_is_missing(tmp_path):
    runs = {
        "mf": {"test": _test(0.61, warm=0.62, cold=0.55), "trainable_parameters": 1600, "steps": 3,
               "ranking": {"recall@1": 0.25, "recall@10": 1.0, "recall@5": 0.75, "ndcg@5": 0.5, "ndcg@1": 0.25,
                           "ndcg@10": 0.6, "mrr": 0.45, "n_queries": 12, "user_mrr": 0.4, "auc": 0.6}},
        "no-injection": {"test": _test(0.5, warm=0.5), "trainable_parameters": 0, "steps": 0},
        # an older run: no cost keys, no ranking, an undefined AUC (None) and a NaN
        "cora": {"test": _test(None, warm=float("nan")), "steps": 8},
        "tallrec": {"test": _test(0.7, warm=0.71, cold=0.6), "trainable_parameters": 4096,
                    "samples_per_second": 123.456, "steps": 8, "train_seconds": 12.34,
                    "no_injection_test": _test(0.52),
                    "no_injection_ranking": {"recall@10": 0.375, "ndcg@10": 0.25, "mrr": 0.2, "recall@1": 0.1}},
    }
    rows = [row(m, metrics) for m, metrics in runs.items()]
    cols = columns(rows)
    assert cols == ["method", "auc", "uauc", "n", "untrained_auc", "untrained_uauc", "warm_auc", "warm_uauc",
                    "warm_n", "cold_auc", "cold_uauc", "cold_n", "recall@1", "recall@5", "recall@10", "ndcg@1", "ndcg@5", "ndcg@10", "mrr",
                    "untrained_recall@10", "untrained_ndcg@10", "trainable_parameters", "samples_per_second", "steps", "train_seconds"]
    write_csv(rows, tmp_path / "compare.csv")
    write_markdown(rows, tmp_path / "compare.md", "cora compare --methods mf", "context line",
                   {"mf": "the CF model alone", "cora": "CoRA"})
    with open(tmp_path / "compare.csv", newline="") as f:
        table = list(csv.reader(f))
    header, body = _read_md_table(tmp_path / "compare.md")
    assert table[0] == cols == header and len(table) - 1 == len(body) == 4
    for got, shown in zip(table[1:], body):
        for c, a, b in zip(cols, got, shown):
            if a == "" or c in ("method", "n", "warm_n", "cold_n", "trainable_parameters", "steps"):
                assert a == b, (c, a, b)
            else:
                digits = {"samples_per_second": 1, "train_seconds": 2}.get(c, 4)
                assert f"{float(a):.{digits}f}" == b, (c, a, b)
    by = {r[0]: dict(zip(cols, r)) for r in table[1:]}
    assert by["mf"]["recall@5"] == "0.75" and by["mf"]["mrr"] == "0.45" and by["mf"]["cold_uauc"] == ""
    assert all(by["cora"][c] == "" for c in cols if c not in ("method", "n", "warm_n", "steps")), by["cora"]
    assert by["cora"]["steps"] == "8" and by["cora"]["n"] == "80" and by["cora"]["warm_n"] == "70"
    assert by["tallrec"]["samples_per_second"] == "123.456" and by["tallrec"]["recall@1"] == ""
    assert by["tallrec"]["untrained_auc"] == "0.52" and by["no-injection"]["untrained_auc"] == ""
    assert by["tallrec"]["untrained_recall@10"] == "0.375" and by["tallrec"]["untrained_ndcg@10"] == "0.25"
    assert by["mf"]["untrained_recall@10"] == ""                 # only the step-0 ranking of its own run
    assert by["no-injection"]["cold_auc"] == "" and by["no-injection"]["trainable_parameters"] == "0"
    md = (tmp_path / "compare.md").read_text()
    assert md.startswith("# Method comparison") and "cora compare --methods mf" in md and "context line" in md
    assert "- **mf**: the CF model alone" in md and "- **cora**: CoRA" in md and "**tallrec**" not in md
    assert "| 123.5 |" in md and "| 12.34 |" in md
    plot(rows, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG


def test_without_ranking_metrics_there_are_no_ranking_columns():
    rows = [row("cora", {"test": _test(0.7)}), row("mf", {"test": _test(0.6), "ranking": None})]
    assert not [c for c in columns(rows) if "@" in c or c == "mrr"]


def test_no_injection_comes_from_cora_else_tallrec_never_collm():
    tallrec, cora = {"no_injection_test": _test(0.51)}, {"no_injection_test": _test(0.52)}
    assert no_injection({"tallrec": tallrec, "cora": cora})[1] == "cora"
    got, source = no_injection({"tallrec": tallrec, "cora": {"no_injection_test": None}})
    assert source == "tallrec" and got["test"]["auc"] == 0.51 and got["steps"] == 0
    assert no_injection({"collm": {"no_injection_test": _test(0.6)}}) == ({}, None)


def test_bdlm_domain_is_a_row_of_the_bdlm_run_which_it_trains_when_bdlm_is_not_asked_for():
    assert run_order(parse_methods("bdlm-domain,mf")) == ["bdlm"]
    assert run_order(parse_methods("bdlm,bdlm-domain,cora")) == ["bdlm", "cora"]
    bdlm = {"test": _test(0.7), "domain_test": _test(0.65), "domain_parameters": 800, "steps": 20}
    llm, domain = row("bdlm", bdlm), row("bdlm-domain", side_metrics(bdlm))
    assert llm["auc"] == 0.7 and domain["auc"] == 0.65
    assert domain["trainable_parameters"] == 800 and domain["steps"] is None
    assert row("bdlm-domain", side_metrics({"test": _test(0.7)}))["auc"] is None    # no domain phase ran: empty


# ---------------------------------------------------------------- the resume decision

CONFIGS = ["configs/demo.yaml"]


def _overrides(tmp_path, *extra):
    return [f"data.data_dir={tmp_path / 'data'}", f"data.cf_dir={tmp_path / 'cf'}", "run.max_steps=4", *extra]


def _finish(run, config=None, metrics=True):
    """A hand-made run directory: config.json (the run's resolved config, or ``config``) and metrics.json."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if config is not False:
        (run.run_dir / "config.json").write_text(json.dumps(config or run.config, indent=1))
    if metrics:
        (run.run_dir / "metrics.json").write_text(json.dumps({"test": _test(0.6)}))


def test_the_resolved_config_is_what_cora_train_writes(tmp_path):
    run = resolve(CONFIGS, ["data.data_dir=rel/data", "data.cf_dir=s3://bucket/cf", "run.checkpoint_uri=s3://b/ck/"],
                  "cora", tmp_path / "out")
    assert run.run_dir == (tmp_path / "out" / "cora").absolute()
    assert run.overrides == ["method=cora", f"run.run_dir={run.run_dir}", "run.checkpoint_uri=s3://b/ck/cora"]
    assert run.config["data"]["data_dir"] == str(Path("rel/data").absolute())      # as `cora train` saves it
    assert run.config["data"]["cf_dir"] == "s3://bucket/cf" and run.config["method"] == "cora"
    assert run.config["run"]["run_dir"] == str(run.run_dir)
    assert run.config["run"]["checkpoint_uri"] == "s3://b/ck/cora"                  # the runs never share one


@pytest.mark.skipif("collm" not in TrainConfig.__dataclass_fields__, reason="method=collm is not in cora train yet")
def test_collm_is_trained_from_the_tallrec_runs_export(tmp_path):
    run = resolve(CONFIGS, _overrides(tmp_path), "collm", tmp_path / "out")
    export = (tmp_path / "out" / "tallrec" / "export").absolute()
    assert f"collm.lora_from={export}" in run.overrides and run.config["collm"]["lora_from"] == str(export)


def test_a_finished_run_of_the_same_config_is_reused_an_interrupted_one_continued(tmp_path):
    out = tmp_path / "out"
    fresh = resolve(CONFIGS, _overrides(tmp_path), "cora", out)
    assert decide(fresh, overwrite=False).action == "train"
    fresh.run_dir.mkdir(parents=True)
    assert decide(fresh, overwrite=False).action == "train"                # empty: nothing to resume
    # continued with run.resume=auto, its config.json says so: resume and overwrite are not compared
    _finish(fresh, dict(fresh.config, run=dict(fresh.config["run"], resume="auto")), metrics=False)
    assert decide(fresh, overwrite=False).action == "continue"
    _finish(fresh)
    assert decide(fresh, overwrite=False).action == "reuse"
    assert decide(fresh, overwrite=True).action == "reuse"                  # --overwrite replaces mismatches only
    bare = resolve(CONFIGS, _overrides(tmp_path), "tallrec", out)
    bare.run_dir.mkdir(parents=True)
    (bare.run_dir / "ray").mkdir()                                           # killed before config.json
    assert decide(bare, overwrite=False).action == "continue"


def test_a_run_of_another_config_is_refused_naming_the_keys_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    before = resolve(CONFIGS, _overrides(tmp_path), "cora", out)
    _finish(before)
    now = resolve(CONFIGS, _overrides(tmp_path, "run.max_steps=6", "optim.lr_peak=2e-3"), "cora", out)
    with pytest.raises(CompareError) as e:
        decide(now, overwrite=False)
    msg = str(e.value)
    assert f"{now.run_dir} holds a finished cora run with another config" in msg
    assert "optim.lr_peak was 0.001, now 0.002" in msg and "run.max_steps was 4, now 6" in msg
    assert "--overwrite" in msg and "run.seed" not in msg
    assert decide(now, overwrite=True).action == "overwrite"
    (now.run_dir / "metrics.json").unlink()                                  # interrupted: refused the same way
    with pytest.raises(CompareError, match="holds an interrupted cora run with another config"):
        decide(now, overwrite=False)
    (now.run_dir / "config.json").unlink()
    _finish(now, config=False)                                               # metrics.json alone: unknown config
    with pytest.raises(CompareError, match="holds metrics.json but no config.json"):
        decide(now, overwrite=False)


def test_every_refusal_is_reported_at_once_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    for method in ("tallrec", "cora"):
        _finish(resolve(CONFIGS, _overrides(tmp_path), method, out))
    with pytest.raises(CompareError) as e:
        plan(CONFIGS, _overrides(tmp_path, "run.seed=3"), ["tallrec", "cora", "mf"], out, overwrite=False)
    assert "2 run(s)" in str(e.value) and str(out / "tallrec") in str(e.value) and str(out / "cora") in str(e.value)
    runs = plan(CONFIGS, _overrides(tmp_path), ["cora", "mf", "tallrec"], out, overwrite=False)
    assert [(r.method, r.action) for r in runs] == [("cora", "reuse"), ("tallrec", "reuse")]


def test_collm_is_not_reused_when_tallrec_is_trained_again(tmp_path):
    out = tmp_path / "out"
    _finish(resolve(CONFIGS, _overrides(tmp_path), "collm", out))
    with pytest.raises(CompareError, match="collm's results would not be those of the new tallrec run"):
        plan(CONFIGS, _overrides(tmp_path), ["tallrec", "collm"], out, overwrite=False)
    runs = plan(CONFIGS, _overrides(tmp_path), ["collm", "tallrec"], out, overwrite=True)
    assert [(r.method, r.action) for r in runs] == [("tallrec", "train"), ("collm", "overwrite")]
    _finish(runs[0])
    assert [r.action for r in plan(CONFIGS, _overrides(tmp_path), ["tallrec", "collm"], out, False)] == ["reuse"] * 2


# ---------------------------------------------------------------- mf: the CF run's own predictions

@pytest.fixture(scope="module")
def cf_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare_cf")
    assert main(["prepare", "--source", "synthetic", "--out", str(tmp / "data"), "--users", "40", "--items", "30",
                 "--interactions", "500", "--rank-negatives", "4", "--no-progress"]) == 0
    assert main(["train-cf", "--data", str(tmp / "data"), "--model", "mf", "--out", str(tmp / "cf"), "--dim", "8",
                 "--epochs", "2", "--batch-size", "64", "--no-progress"]) == 0
    return tmp


def test_mf_is_scored_from_the_cf_runs_predictions_like_the_llm_runs(cf_run, tmp_path, capsys):
    from cora.config import load
    cfg = load(TrainConfig, CONFIGS, [f"data.data_dir={cf_run / 'data'}", f"data.cf_dir={cf_run / 'cf'}"])
    metrics, note = cf_metrics(cfg)
    own = json.loads((cf_run / "cf" / "metrics.json").read_text())
    preds = pq.read_table(cf_run / "cf" / "test_predictions.parquet").to_pandas()
    assert metrics["test"]["auc"] == pytest.approx(roc_auc_score(preds["label"], preds["score"]), abs=1e-12)
    assert metrics["test"]["auc"] == pytest.approx(own["test"]["auc"], abs=1e-12)
    assert metrics["test"]["warm"]["n"] + metrics["test"]["cold"]["n"] == metrics["test"]["n"] == len(preds)
    assert "test_predictions.parquet" in note and "(mf, `cora train-cf`)" in note
    # the CF model's parameters and its ranking of the rank split, recomputed from the embedding tables
    users = read_embeddings(cf_run / "cf" / "user_embeddings.parquet")
    items = read_embeddings(cf_run / "cf" / "item_embeddings.parquet")
    assert metrics["trainable_parameters"] == users.size + items.size
    rank = pq.read_table(cf_run / "data" / "rank.parquet").to_pandas()
    scores = (users[rank["user"]] * items[rank["item"]]).sum(1)
    want = ranking(rank["query"], rank["label"], scores, users=rank["user"])
    assert metrics["ranking"]["mrr"] == pytest.approx(want["mrr"], abs=1e-6) and 0 < want["mrr"] <= 1
    assert metrics["steps"] == own["epochs_run"] * -(-own["n_train"] // 64) and metrics["train_seconds"] > 0
    # a CF run of other data is refused, not scored against the wrong rows: other rows, or another label
    import shutil
    test = pq.read_table(cf_run / "data" / "test.parquet")
    for name, changed, says in (("fewer", test.slice(1), f"scores {len(test)} rows that are not the {len(test) - 1}"),
                                ("flipped", test.set_column(test.schema.get_field_index("label"), "label",
                                                            pc.subtract(1, test["label"]).cast(pa.int8())),
                                 "the label columns of")):
        shutil.copytree(cf_run / "data", tmp_path / name)
        pq.write_table(changed, tmp_path / name / "test.parquet")
        other = load(TrainConfig, CONFIGS, [f"data.data_dir={tmp_path / name}", f"data.cf_dir={cf_run / 'cf'}"])
        with pytest.raises(DatasetError, match="data.cf_dir was trained on other data") as e:
            cf_metrics(other)
        assert says in str(e.value)


def test_mf_alone_needs_no_training_and_writes_the_report(cf_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--config", "configs/demo.yaml", "--methods", "mf", "--out", str(out),
                 f"data.data_dir={cf_run / 'data'}", f"data.cf_dir={cf_run / 'cf'}"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert [r["method"] for r in summary["rows"]] == ["mf"] and summary["runs"] == {}
    assert "| mf |" in captured.err and sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.md",
                                                                                  "compare.png"]
    with open(out / "compare.csv", newline="") as f:
        [got] = list(csv.DictReader(f))
    assert float(got["auc"]) == summary["rows"][0]["auc"] and got["recall@1"] != ""


def test_differences_from_a_row_are_the_paired_bootstrap_of_the_same_test_rows(cf_run):
    """paired_differences: each method minus the reference on all / warm / cold rows, equal to the direct
    difference of the AUCs; rows of other data are refused; --versus must name a row with predictions."""
    import numpy as np

    from trainer.compare import cf_predictions, check_versus, paired_differences
    from trainer.compare_report import differences_markdown
    mf = cf_predictions(str(cf_run / "cf" / "test_predictions.parquet"), cf_run / "data")
    assert list(mf.columns) == ["user", "label", "cold", "score"] and mf.index.name == "sample_id"
    rng = np.random.default_rng(0)
    oracle = mf.assign(score=mf["label"] + rng.normal(0, 0.3, len(mf))).sample(frac=1, random_state=0)  # reordered
    diffs = paired_differences({"mf": mf, "oracle": oracle, "none": None}, "mf", ["mf", "oracle", "none"], reps=200)
    subsets = ["all", "warm"] + (["cold"] if mf["cold"].any() else [])
    assert [(d["method"], d["subset"]) for d in diffs] == [("oracle", s) for s in subsets]
    d = diffs[0]
    want = roc_auc_score(mf["label"], oracle.loc[mf.index, "score"]) - roc_auc_score(mf["label"], mf["score"])
    assert d["auc_diff"] == pytest.approx(want, abs=1e-9) and d["n"] == len(mf)
    assert d["auc_low"] <= d["auc_diff"] <= d["auc_high"] and 0 <= d["auc_p_not_above"] <= 1
    md = differences_markdown(diffs, "mf", reps=200)
    assert "## Differences from mf" in md and f"| oracle | all | {len(mf)} |" in md and "200 resamples" in md
    with pytest.raises(CompareError, match="not of the same rows as mf"):
        paired_differences({"mf": mf, "oracle": oracle.iloc[1:]}, "mf", ["mf", "oracle"], reps=10)
    assert check_versus("auto", ["mf", "tallrec"]) == "tallrec" and check_versus("auto", ["mf", "cora"]) is None
    assert check_versus("none", ["tallrec"]) is None and check_versus("cora", ["tallrec", "cora"]) == "cora"
    with pytest.raises(CompareError, match="no per-sample predictions"):
        check_versus("no-injection", ["no-injection", "cora"])
    with pytest.raises(CompareError, match="--versus collm: not one of the rows"):
        check_versus("collm", ["mf", "cora"])


# ---------------------------------------------------------------- end to end

def _compare(out, data, cf, methods):
    cmd = [sys.executable, "-m", "trainer.cli", "compare", "--config", "configs/demo.yaml", "--methods", methods,
           "--out", str(out), f"data.data_dir={data}", f"data.cf_dir={cf}", "run.epochs=1", "run.max_steps=2",
           "run.workers=1", "run.dashboard=false", "data.eval_batch_size=64", "run.checkpoint_every=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout), done.stderr


@pytest.mark.slow
def test_compare_end_to_end_then_again_reusing_every_run(tmp_path):
    data, cf, out = tmp_path / "data", tmp_path / "cf", tmp_path / "out"
    assert main(["prepare", "--source", "synthetic", "--out", str(data), "--users", "40", "--items", "30",
                 "--interactions", "500", "--rank-negatives", "4", "--no-progress"]) == 0
    assert main(["train-cf", "--data", str(data), "--model", "mf", "--out", str(cf), "--dim", "8", "--epochs", "2",
                 "--no-progress"]) == 0
    methods = ["mf", "no-injection", "collm", "tallrec", "cora"]       # collm given before tallrec: trained after
    llm = ["tallrec", "collm", "cora"]
    summary, err = _compare(out, data, cf, ",".join(methods))
    for i, m in enumerate(llm, 1):
        assert f"[compare] {i}/3 {m}: training -> {out / m}" in err and f"[compare] {i}/3 {m}: done in" in err
        assert f"[compare] {m}: " in err                                  # its `cora train` output, prefixed
    with open(out / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == methods == [r["method"] for r in summary["rows"]]
    for r in rows:
        assert 0 <= float(r["auc"]) <= 1 and 0 <= float(r["warm_auc"]) <= 1, r
    by = {r["method"]: r for r in rows}
    runs = {m: json.loads((out / m / "metrics.json").read_text()) for m in llm}
    for m in llm:
        assert float(by[m]["auc"]) == runs[m]["test"]["auc"] and by[m]["steps"] == "2"
        assert float(by[m]["untrained_auc"]) == runs[m]["no_injection_test"]["auc"]     # its own step-0 score
        assert float(by[m]["untrained_recall@10"]) == runs[m]["no_injection_ranking"]["recall@10"]
        assert runs[m]["method"] == m and int(by[m]["trainable_parameters"]) == runs[m]["trainable_parameters"] > 0
        assert float(by[m]["samples_per_second"]) > 0 and float(by[m]["train_seconds"]) > 0
    collm = json.loads((out / "collm" / "config.json").read_text())["collm"]
    assert collm["lora_from"] == str(out / "tallrec" / "export")
    assert float(by["no-injection"]["auc"]) == runs["cora"]["no_injection_test"]["auc"]
    assert float(by["mf"]["auc"]) == json.loads((cf / "metrics.json").read_text())["test"]["auc"]
    assert by["cora"]["mrr"] != "" and by["mf"]["mrr"] != "" and by["no-injection"]["mrr"] == ""
    assert (out / "compare.png").read_bytes()[:8] == PNG
    md = (out / "compare.md").read_text()
    assert "cora compare --config configs/demo.yaml --methods mf,no-injection,collm,tallrec,cora" in md
    # differences from tallrec (the default --versus), from the runs' own test predictions
    with open(out / "differences.csv", newline="") as f:
        diffs = list(csv.DictReader(f))
    assert {(d["method"], d["subset"]) for d in diffs} >= {(m, "all") for m in ("mf", "collm", "cora")}
    for d in diffs:
        assert d["versus"] in ("tallrec", "untrained") and d["method"] != "no-injection", d
        if d["subset"] == "all":
            ref = by["tallrec"]["auc"] if d["versus"] == "tallrec" else by[d["method"]]["untrained_auc"]
            assert float(d["auc_diff"]) == pytest.approx(float(by[d["method"]]["auc"]) - float(ref), abs=1e-9), d
            assert float(d["auc_low"]) <= float(d["auc_high"])
    # each LLM row against its own model before training (RUN/untrained_test_predictions.parquet)
    assert {d["method"] for d in diffs if d["versus"] == "untrained" and d["subset"] == "all"} == set(llm)
    assert "## Differences from tallrec" in md and summary["differences"]
    assert "## Each method against its own untrained model" in md and summary["against_untrained"]
    # the same command again: nothing is trained, the report is the same
    stamps = {m: (out / m / "metrics.json").stat().st_mtime_ns for m in llm}
    before = (out / "compare.csv").read_text()
    again, err = _compare(out, data, cf, ",".join(methods))
    for i, m in enumerate(llm, 1):
        assert f"[compare] {i}/3 {m}: reused {out / m}" in err
        assert f"[compare] {m}: " not in err                              # no `cora train` started
        assert (out / m / "metrics.json").stat().st_mtime_ns == stamps[m]
    assert {m: again["runs"][m]["action"] for m in llm} == dict.fromkeys(llm, "reuse")
    assert (out / "compare.csv").read_text() == before


def test_reccocktail_rows_train_after_tallrec_and_a_base_spirit_on_the_source_data(tmp_path):
    """reccocktail-paper/-code: after the tallrec row (the ingredient) and the base spirit (tallrec on
    --source-data, OUT_DIR/reccocktail-base, no row), each with its form and both exports; refused without
    tallrec or without the source data; stale when the base spirit trains again."""
    assert run_order(["reccocktail-code", "cora", "tallrec", "reccocktail-paper"]) == [
        "tallrec", "reccocktail-base", "reccocktail-code", "cora", "reccocktail-paper"]
    with pytest.raises(CompareError, match="reccocktail-code merges the tallrec run's LoRA .* add tallrec"):
        parse_methods("cora,reccocktail-code")
    assert parse_methods("cora,reccocktail,tallrec") == ["cora", "reccocktail-paper", "reccocktail-code", "tallrec"]
    with pytest.raises(CompareError, match="given more than once: reccocktail-paper"):
        parse_methods("reccocktail,reccocktail-paper,tallrec")
    out, source = tmp_path / "out", (str(tmp_path / "src"), str(tmp_path / "src-cf"))
    with pytest.raises(CompareError, match="pass --source-data DIR --source-cf CF_DIR"):
        plan(CONFIGS, _overrides(tmp_path), ["tallrec", "reccocktail-paper"], out, overwrite=False)
    runs = plan(CONFIGS, _overrides(tmp_path), ["reccocktail-paper", "tallrec"], out, False, source)
    assert [(r.method, r.action) for r in runs] == [("tallrec", "train"), ("reccocktail-base", "train"),
                                                    ("reccocktail-paper", "train")]
    base, row_ = runs[1].config, runs[2].config
    assert base["method"] == "tallrec" and base["data"]["data_dir"] == source[0] and base["data"]["cf_dir"] == source[1]
    assert row_["method"] == "reccocktail" and row_["reccocktail"] == {
        "form": "paper", "entropy": "answer", "base_from": str((out / "reccocktail-base" / "export").absolute()),
        "ingredient_from": str((out / "tallrec" / "export").absolute())}
    assert row_["data"]["data_dir"] != source[0]                      # the merge is on the target data
    for run in runs[1:]:
        _finish(run)
    with pytest.raises(CompareError, match="reccocktail-paper's results would not be those of the new tallrec run"):
        plan(CONFIGS, _overrides(tmp_path), ["tallrec", "reccocktail-paper"], out, False, source)
