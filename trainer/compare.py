"""``cora compare``: train the requested methods on the same data, CF model, seed and step budget, and
report them side by side.

    cora compare --config CONFIG.yaml [--config more.yaml] --methods mf,no-injection,tallrec,collm,cora
                 --out OUT_DIR [--versus METHOD|none] [--overwrite] [key=value ...]
      -> OUT_DIR/<method>/  one `cora train` run directory per LLM method
         OUT_DIR/compare.csv, OUT_DIR/compare.md (one row per method, in --methods order),
         OUT_DIR/compare.png (test AUC and UAUC: overall, warm, cold); the table (markdown) on stderr,
         a JSON summary on stdout; with a --versus row (default: tallrec when it is one), each row's
         AUC/UAUC difference from it on the same test rows (all, warm, cold) with a 95% paired bootstrap
         interval over users, in compare.md and OUT_DIR/differences.csv

The methods:

    mf            the CF model alone (data.cf_dir, written by `cora train-cf`; whichever CF model it holds):
                  its test predictions scored here with cora.metrics.evaluate, exactly as the LLM runs' are;
                  ranking metrics from the CF model scoring the rank split, when the data has one
    no-injection  the frozen LLM before any training (P = 0) on the text prompt: the no_injection_test the
                  cora run (else the tallrec run) scores before its first step
    tallrec       cora train method=tallrec   (LoRA on the text prompt, no CF input)
    collm         cora train method=collm collm.lora_from=OUT_DIR/tallrec/export   (runs after tallrec)
    cora          cora train method=cora
    laser         cora train method=laser     (M-Former prefix + suffix token; cosine against item encodings)
    bdlm          cora train method=bdlm      (ID slots fed from a store shared with a LightGCN domain model)
    bdlm-domain   that run's domain model (LightGCN on the shared store after mutual learning): its domain_test;
                  asking for it trains the bdlm run when bdlm is not asked for itself
    reccocktail-paper, reccocktail-code   (reccocktail: both)
                  cora train method=reccocktail reccocktail.form=paper|code, merging the tallrec run's LoRA (the
                  ingredient) with a base spirit: a tallrec run on --source-data/--source-cf in
                  OUT_DIR/reccocktail-base (trained first; not a row)

Each LLM method is one `cora train` subprocess, so each run has a Ray instance of its own, with the same
configs and overrides plus method=<m> and run.run_dir=OUT_DIR/<m> (and, when the config sets
run.checkpoint_uri, run.checkpoint_uri=<uri>/<m>: the runs never share checkpoints). Its output is
streamed to stderr, each line prefixed with ``[compare] <m>:``.

Resumable per method: a finished run (RUN/metrics.json) whose RUN/config.json equals the config it
would be run with now is reused; an interrupted one (no metrics.json) with the same config is
continued (run.resume=auto); one with another config is refused, naming the keys that differ, unless
``--overwrite`` (run.overwrite=true: trained again). The comparison leaves out run.resume and
run.overwrite only: they say how a run is started, which is what compare decides. A collm run is
trained from the tallrec run's export, so it is not reused or continued when tallrec trains again.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from cora.config import ConfigError, load, parse_overrides, to_dict
from cora.data.schema import DatasetError
from cora.fileio import is_remote, open_fs

from .config import TrainConfig
from .compare_report import (UNTRAINED, cell, differences_markdown, markdown_table, row, write_csv,
                             write_markdown, plot)
from .train import flatten

LLM_METHODS = ("tallrec", "collm", "cora", "laser", "reccocktail-paper", "reccocktail-code", "bdlm")
METHODS = ("mf", "no-injection") + LLM_METHODS + ("bdlm-domain",)
SHORTHANDS = {"reccocktail": ("reccocktail-paper", "reccocktail-code")}
SIDE_ROWS = {"bdlm-domain": "bdlm"}
"""Rows read from another method's run (no run of their own): BDLM's domain model, from the bdlm run."""
BASE = "reccocktail-base"
"""The run that is no row: RecCocktail's "base spirit", a tallrec run on --source-data (OUT_DIR/reccocktail-base)."""
NEEDS = {"collm": ("tallrec",), "reccocktail-paper": ("tallrec", BASE), "reccocktail-code": ("tallrec", BASE)}
"""The runs each run is trained from (they are trained first; it is trained again when they are)."""
NO_INJECTION_FROM = ("cora", "tallrec")
"""Runs whose step 0 is the frozen LLM on the text prompt, in order of preference (collm's step 0 is not:
it carries the tallrec LoRA and the mapped CF embeddings)."""
MANAGED = ("method", "run.run_dir", "run.resume", "run.overwrite", "collm.lora_from", "reccocktail.form",
           "reccocktail.base_from", "reccocktail.ingredient_from")
"""Keys compare sets per method: refused as user overrides."""
UNCOMPARED = ("run.resume", "run.overwrite")
"""Left out when a saved run's config is compared with the one it would be run with now."""
START = {"train": ["run.resume=never", "run.overwrite=false"],
         "continue": ["run.resume=auto", "run.overwrite=false"],
         "overwrite": ["run.resume=never", "run.overwrite=true"]}
"""How `cora train` is started for each decision ("reuse" does not start it)."""
BOOTSTRAP_REPS = 2000
"""Resamples of the users for the intervals of the differences (compare.md's second table)."""
NOTES = {
    "mf": "the CF model alone ({model}, `cora train-cf`), no LLM: {source}; its cost columns are its own "
          "training (steps = epochs x batches)",
    "no-injection": "the frozen LLM without injection (P = 0, before any training) on the text prompt, scored "
                    "by the {source} run before its first step; nothing trained",
    "tallrec": "TALLRec: ordinary LoRA on the same text prompt, no CF input",
    "collm": "CoLLM: the CF user and item embeddings mapped into two token slots of its prompt; the mapping "
             "trains, on top of the tallrec run's LoRA (loaded from OUT_DIR/tallrec/export, frozen)",
    "cora": "CoRA: per-sample low-rank weights generated from the CF user and item embeddings",
    "reccocktail-paper": "RecCocktail: the base spirit (tallrec on the source domains, OUT_DIR/reccocktail-base) "
                         "and the ingredient (the tallrec row's LoRA) merged by one global pair of weights "
                         "learned on unlabeled target prompts (the paper's form)",
    "reccocktail-code": "RecCocktail as above, merged by one pair of weights per injected module (the authors' "
                        "code's form)",
    "bdlm": "BDLM: user and item ID slots fed by a small projection from a store of embeddings shared with a "
            "LightGCN domain model; the two are trained in alternation, each towards the other's scores (mutual "
            "learning); the LLM's own scores",
    "bdlm-domain": "BDLM's domain model: LightGCN on the shared store after mutual learning with the LLM, scored "
                   "on its own (the bdlm run's domain_test, at its best domain valid AUC); its parameters are the "
                   "store's tables",
    "laser": "Laser: an M-Former prefix from the history's CF item embeddings and a suffix token; the score is the "
             "cosine between the user's and the item's encodings (trained on the positives, softmax over all items)",
}
ROOT = Path(__file__).resolve().parents[1]          # the checkout (or site-packages) holding this package


class CompareError(ValueError):
    """A request `cora compare` cannot carry out; the message says what to change."""


class TrainFailed(RuntimeError):
    """A `cora train` subprocess exited with an error; ``code`` is its exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- the request

def parse_methods(text: str) -> list[str]:
    """--methods as a list, checked: known names, no duplicates, and what each one needs. ``reccocktail``
    stands for both merge forms, reccocktail-paper and reccocktail-code."""
    names = [n for m in text.split(",") for n in SHORTHANDS.get(m.strip(), (m.strip(),))]
    available = f"available: {', '.join(METHODS)}; reccocktail = both reccocktail forms"
    if not any(names):
        raise CompareError(f"--methods is empty; give a comma-separated list ({available})")
    problems = []
    if "" in names:
        problems.append(f"--methods {text!r} has an empty name (a stray comma)")
    for m in [m for m in names if m and m not in METHODS]:
        close = difflib.get_close_matches(m, METHODS, n=1)
        problems.append(f"unknown method {m!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    twice = sorted({m for m in names if m and names.count(m) > 1})
    if twice:
        problems.append(f"method(s) given more than once: {', '.join(twice)}")
    if problems:
        raise CompareError(f"--methods {text!r}: {'; '.join(problems)} ({available})")
    if "collm" in names and "tallrec" not in names:
        raise CompareError(f"--methods {text!r}: collm is trained from TALLRec's stage (collm.lora_from="
                           f"OUT_DIR/tallrec/export): add tallrec, e.g. --methods {text},tallrec")
    cocktail = [m for m in names if m.startswith("reccocktail-")]
    if cocktail and "tallrec" not in names:
        raise CompareError(f"--methods {text!r}: {cocktail[0]} merges the tallrec run's LoRA (its ingredient, "
                           f"trained on the target domain) with a base spirit: add tallrec, e.g. --methods {text},tallrec")
    if "no-injection" in names and not set(names) & set(NO_INJECTION_FROM):
        raise CompareError(f"--methods {text!r}: no-injection is scored by an LLM run (cora or tallrec) before its "
                           f"first step, and none is requested: add cora or tallrec")
    return names


def run_order(methods: list[str]) -> list[str]:
    """The runs in the order they are trained: the LLM methods as given, each after the runs it is trained
    from (``NEEDS``; RecCocktail's base spirit is added when a reccocktail row is asked for)."""
    order: list[str] = []

    def add(m: str) -> None:
        for need in NEEDS.get(m, ()):
            if need == BASE or need in methods:
                add(need)
        if m not in order:
            order.append(m)
    for m in methods:
        if m in LLM_METHODS or m in SIDE_ROWS:
            add(SIDE_ROWS.get(m, m))
    return order


def check_overrides(overrides: list[str]) -> None:
    """Refuse overrides of the keys compare sets per method."""
    taken = sorted(k for k in flatten(parse_overrides(overrides)) if k in MANAGED)
    if taken:
        raise CompareError(f"override(s) of {', '.join(taken)}: cora compare sets these for each method (method, "
                           f"run.run_dir=OUT_DIR/<method>, collm.lora_from=OUT_DIR/tallrec/export, run.resume and "
                           f"run.overwrite from its resume decision); drop them (--overwrite trains runs again)")


# ---------------------------------------------------------------- one run per LLM method, and whether to train it

@dataclass
class Run:
    """One LLM method's `cora train` run in OUT_DIR/<method> and what to do with it."""

    method: str
    run_dir: Path
    overrides: list[str]
    """The method's own overrides, after the user's."""
    config: dict
    """The resolved config, as `cora train` writes it to RUN/config.json."""
    action: str = "train"
    """reuse (finished, same config), train (nothing there), continue (interrupted), overwrite."""
    why: str = ""


def resolve(configs: list[str], overrides: list[str], method: str, out: Path, source: tuple | None = None) -> Run:
    """The run of ``method``: its overrides and the config `cora train` will resolve from them. ``source``:
    (data dir, CF dir) of RecCocktail's source domains (for the base spirit's run)."""
    run_dir = (out / method).absolute()
    trained_as = "tallrec" if method == BASE else method.split("-")[0]
    own = [f"method={trained_as}", f"run.run_dir={run_dir}"]
    if method == "collm":
        own.append(f"collm.lora_from={run_dir.parent / 'tallrec' / 'export'}")
    if method == BASE:
        if source is None:
            raise CompareError("reccocktail rows need the source domains' data for the base spirit: pass "
                               "--source-data DIR --source-cf CF_DIR (`cora prepare ... --target-domain` writes "
                               "OUT/source beside OUT/target; train its CF model with `cora train-cf`)")
        own += [f"data.data_dir={source[0]}", f"data.cf_dir={source[1]}"]
    if method in ("reccocktail-paper", "reccocktail-code"):
        own += [f"reccocktail.form={method.split('-')[1]}", f"reccocktail.base_from={run_dir.parent / BASE / 'export'}",
                f"reccocktail.ingredient_from={run_dir.parent / 'tallrec' / 'export'}"]
    try:
        cfg = load(TrainConfig, configs, overrides + own)
    except ConfigError as e:
        raise ConfigError(e.problems, source=f"{e.source}, method={method}") from None
    if cfg.run.checkpoint_uri:
        cfg.run.checkpoint_uri = f"{cfg.run.checkpoint_uri.rstrip('/')}/{method}"
        own.append(f"run.checkpoint_uri={cfg.run.checkpoint_uri}")
    absolute_paths(cfg)
    return Run(method, run_dir, own, json.loads(json.dumps(to_dict(cfg))))


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """data.data_dir and data.cf_dir made absolute when local, as trainer.train.train does before it writes
    RUN/config.json."""
    for key in ("data_dir", "cf_dir"):
        value = getattr(cfg.data, key)
        if not is_remote(value):
            setattr(cfg.data, key, str(Path(value).absolute()))
    return cfg


def differences(saved: dict, want: dict) -> dict[str, tuple]:
    """{key: (saved value, wanted value)} of every compared key whose values differ."""
    old, new = flatten(saved), flatten(want)
    absent = "<absent>"
    return {k: (old.get(k, absent), new.get(k, absent)) for k in sorted(set(old) | set(new))
            if k not in UNCOMPARED and old.get(k, absent) != new.get(k, absent)}


def decide(run: Run, overwrite: bool) -> Run:
    """The run with its action: reuse, train, continue or overwrite; CompareError when OUT_DIR/<method> holds
    a run of another config (or of an unknown one) and ``overwrite`` is not set."""
    d = run.run_dir
    if not d.is_dir() or not any(d.iterdir()):
        return replace(run, action="train", why="no earlier run")
    finished, saved = (d / "metrics.json").is_file(), d / "config.json"
    state = "a finished" if finished else "an interrupted"
    if saved.is_file():
        try:
            diff = differences(json.loads(saved.read_text()), run.config)
        except ValueError as e:
            diff = {"config.json": (f"unreadable ({e})", "")}
        if not diff:
            return replace(run, action="reuse" if finished else "continue", why=f"{state.split()[1]}, same config")
        shown = "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in list(diff.items())[:6])
        more = f" (and {len(diff) - 6} more: {', '.join(list(diff)[6:])})" if len(diff) > 6 else ""
        problem = f"{d} holds {state} {run.method} run with another config: {shown}{more}"
    elif finished:
        problem = f"{d} holds metrics.json but no config.json: what it was trained with is unknown"
    else:
        return replace(run, action="continue", why="interrupted before it saved its config")
    if overwrite:
        return replace(run, action="overwrite", why=problem)
    raise CompareError(f"{problem}; run compare with the config that run had, choose another --out, or pass "
                       f"--overwrite to train {run.method} again")


def plan(configs: list[str], overrides: list[str], methods: list[str], out: Path, overwrite: bool,
         source: tuple | None = None) -> list[Run]:
    """The LLM runs in training order, each with its action; every refusal reported at once."""
    runs, problems = [], []
    for method in run_order(methods):
        try:
            runs.append(decide(resolve(configs, overrides, method, out, source), overwrite))
        except CompareError as e:
            problems.append(str(e))
    for i, run in enumerate(runs):        # a run trained from one that trains again is stale
        by = {r.method: r for r in runs}
        again = [by[n] for n in NEEDS.get(run.method, ()) if n in by and by[n].action != "reuse"]
        if not again or run.action == "train":
            continue
        problem = (f"{run.run_dir} was trained from {again[0].run_dir / 'export'}, which is to be trained again "
                   f"({again[0].action}): {run.method}'s results would not be those of the new {again[0].method} run")
        if overwrite:
            runs[i] = replace(run, action="overwrite", why=problem)
        else:
            problems.append(f"{problem}; pass --overwrite to train {run.method} again (or remove {run.run_dir})")
    if problems:
        raise CompareError("\n  - ".join([f"{len(problems)} run(s) in {out} cannot be used as they are:"] + problems))
    return runs


# ---------------------------------------------------------------- training

def train_command(run: Run, configs: list[str], overrides: list[str]) -> list[str]:
    """The `cora train` command line of ``run`` (run.action not reuse)."""
    files = [a for c in configs for a in ("--config", c)]
    return [sys.executable, "-m", "trainer.cli", "train", *files, *overrides, *run.overrides, *START[run.action]]


def execute(run: Run, configs: list[str], overrides: list[str], i: int, n: int) -> None:
    """Train (or continue) ``run`` in a `cora train` subprocess, its output streamed to stderr with a prefix."""
    tag = f"[compare] {i}/{n} {run.method}"
    if run.action == "reuse":
        print(f"{tag}: reused {run.run_dir} ({run.why}): not trained again", file=sys.stderr, flush=True)
        return
    what = {"train": "training", "continue": "continuing (run.resume=auto)", "overwrite": "training again "
            "(run.overwrite=true)"}[run.action]
    cmd = train_command(run, configs, overrides)
    print(f"{tag}: {what} -> {run.run_dir} ({run.why})\n{tag}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    path = os.environ.get("PYTHONPATH")          # the child imports this same code
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([path] if path else [])))
    t0 = time.monotonic()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          env=env) as proc:
        for line in proc.stdout:
            print(f"[compare] {run.method}: {line.rstrip()}", file=sys.stderr, flush=True)
    took = _clock(time.monotonic() - t0)
    if proc.returncode != 0:
        raise TrainFailed(f"`cora train` for {run.method} exited with status {proc.returncode} after {took} (its "
                          f"output is above, prefixed '[compare] {run.method}:'); fix the cause and run the same "
                          f"`cora compare` command again: finished runs are reused and {run.method} continues from "
                          f"its newest committed checkpoint", proc.returncode)
    if not (run.run_dir / "metrics.json").is_file():
        raise TrainFailed(f"`cora train` for {run.method} exited with status 0 but wrote no "
                          f"{run.run_dir / 'metrics.json'}", 1)
    print(f"{tag}: done in {took}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


# ---------------------------------------------------------------- the baselines without a run of their own

def _read_json(uri: str) -> dict | None:
    fs, path = open_fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def cf_metrics(cfg: TrainConfig) -> tuple[dict, str]:
    """(the CF model's results in the shape of a run's metrics.json, its note for compare.md).
    Test: CF_DIR/test_predictions.parquet scored with cora.metrics.evaluate over DATA_DIR/test.parquet's
    cold flags (CF_DIR/metrics.json's own test metrics when the file is absent, from older CF runs)."""
    cf_dir, data_dir = cfg.data.cf_dir.rstrip("/"), Path(cfg.data.data_dir)
    meta, own = _read_json(f"{cf_dir}/cf.json"), _read_json(f"{cf_dir}/metrics.json")
    if meta is None or own is None:
        raise DatasetError(f"mf: data.cf_dir={cf_dir} is not a CF run (no cf.json or metrics.json); create it with "
                           f"`cora train-cf --data {data_dir} --out {cf_dir}`")
    test = cf_test(f"{cf_dir}/test_predictions.parquet", data_dir)
    source = "its test predictions (CF_DIR/test_predictions.parquet) scored as the LLM runs' are"
    if test is None:
        test, source = own["test"], "CF_DIR/metrics.json's test metrics (the CF run has no test_predictions.parquet)"
    epochs, n_train = own.get("epochs") or [], own.get("n_train")
    seconds = sum(e.get("train_seconds", 0.0) for e in epochs) or None
    batch = (meta.get("config") or {}).get("batch_size")
    metrics = {"test": test, "ranking": None, "train_seconds": seconds,
               "steps": len(epochs) * -(-n_train // batch) if n_train and batch and epochs else None,
               "samples_per_second": n_train * len(epochs) / seconds if n_train and seconds else None}
    if not is_remote(cf_dir):
        metrics.update(cf_model_metrics(cf_dir, data_dir))
    return metrics, NOTES["mf"].format(model=meta.get("model", "?"), source=source)


def cf_test(uri: str, data_dir: Path) -> dict | None:
    """cora.metrics.evaluate of a CF run's test predictions (None when the file is absent); the rows must be
    DATA_DIR/test.parquet's."""
    from cora.metrics import evaluate
    preds = cf_predictions(uri, data_dir)
    if preds is None:
        return None
    return evaluate(preds["label"].to_numpy(), preds["score"].to_numpy(), preds["user"].to_numpy(),
                    cold=preds["cold"].to_numpy(dtype=bool))


def cf_predictions(uri: str, data_dir: Path):
    """A CF run's test predictions as a frame indexed by sample_id (user, label, cold, score), the cold flags
    from DATA_DIR/test.parquet; None when the file is absent. Refused when its rows are not test.parquet's."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    fs, path = open_fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    preds = pq.read_table(path, filesystem=fs).to_pandas()
    table = pq.read_table(data_dir / "test.parquet", columns=["sample_id", "user", "label", "cold_user", "cold_item"])
    cold = pc.or_(pc.fill_null(table["cold_user"], False), pc.fill_null(table["cold_item"], False))
    test = table.select(["sample_id", "user", "label"]).append_column("cold", cold).to_pandas().set_index("sample_id")
    if len(preds) != len(test) or not preds["sample_id"].isin(test.index).all():
        raise DatasetError(f"mf: {uri} scores {len(preds)} rows that are not the {len(test)} rows of "
                           f"{data_dir / 'test.parquet'}: data.cf_dir was trained on other data; train it again on "
                           f"data.data_dir with `cora train-cf`")
    rows = test.loc[preds["sample_id"]]
    differ = [c for c in ("user", "label") if (rows[c].to_numpy() != preds[c].to_numpy()).any()]
    if differ:
        raise DatasetError(f"mf: the {' and '.join(differ)} columns of {uri} differ from {data_dir / 'test.parquet'}'s "
                           f"for the same sample ids: data.cf_dir was trained on other data; train it again on "
                           f"data.data_dir with `cora train-cf`")
    return preds.assign(cold=rows["cold"].to_numpy(dtype=bool)).set_index("sample_id")[["user", "label", "cold", "score"]]


def run_predictions(run_dir: Path, name: str = "test"):
    """RUN/<name>_predictions.parquet of a `cora train` run as cf_predictions' frame (``name`` "untrained_test":
    its model's before the first step); None when absent."""
    import pandas as pd
    import pyarrow.parquet as pq
    path = run_dir / f"{name}_predictions.parquet"
    if not path.is_file():
        return None
    t = pq.read_table(path, columns=["sample_ids", "users", "labels", "cold", "scores"]).to_pandas()
    return pd.DataFrame({"user": t["users"].to_numpy(), "label": t["labels"].to_numpy(),
                         "cold": t["cold"].to_numpy(dtype=bool), "score": t["scores"].to_numpy()},
                        index=pd.Index(t["sample_ids"].to_numpy(), name="sample_id"))


def paired_differences(frames: dict, versus: str, methods: list[str], reps: int = BOOTSTRAP_REPS) -> list[dict]:
    """Each method's test AUC and UAUC minus ``versus``'s on the same rows (all, warm, cold), with the paired
    user bootstrap's interval (cora.metrics.paired_bootstrap); methods without predictions are left out."""
    from cora.metrics import paired_bootstrap
    ref = frames[versus]
    out = []
    for m in methods:
        if m == versus or frames.get(m) is None:
            continue
        f = frames[m]
        if len(f) != len(ref) or not f.index.isin(ref.index).all():
            raise CompareError(f"{m}'s test predictions ({len(f)} rows) are not of the same rows as {versus}'s "
                               f"({len(ref)}): the runs used different data; train them again on one data.data_dir")
        f = f.loc[ref.index]
        cold = ref["cold"].to_numpy(dtype=bool)
        for subset, mask in (("all", np.ones_like(cold)), ("warm", ~cold), ("cold", cold)):
            if not mask.any():
                continue
            r = paired_bootstrap(ref["user"].to_numpy()[mask], ref["label"].to_numpy()[mask],
                                 f["score"].to_numpy()[mask], ref["score"].to_numpy()[mask], reps=reps)
            rec = {"method": m, "versus": versus, "subset": subset, "n": r["n"], "users": r["users"]}
            for key in ("auc", "uauc"):
                got = r[key] or {}
                rec.update({f"{key}_diff": got.get("diff"), f"{key}_low": got.get("low"),
                            f"{key}_high": got.get("high"), f"{key}_p_not_above": got.get("p_not_above")})
            out.append(rec)
    return out


def cf_model_metrics(cf_dir: str, data_dir: Path) -> dict:
    """What needs the CF model itself (a local CF_DIR): its parameter count, and ranking metrics of it
    scoring DATA_DIR/rank.parquet when the data has a rank split."""
    import pyarrow.parquet as pq

    from cora.cf import store
    from cora.cf.data import read_split
    from cora.cf.train import load_cf, predict
    from cora.metrics import ranking
    model, cf = load_cf(cf_dir)
    out = {"trainable_parameters": sum(p.numel() for p in model.parameters())}
    rank = data_dir / "rank.parquet"
    if rank.is_file():
        meta = store.read_meta(cf_dir)
        split = read_split(rank, meta["num_users"], meta["num_items"], cf.max_history if cf.model == "sasrec" else None)
        scores = predict(model, split, cf.eval_batch_size)                                   # (N,)
        queries = pq.read_table(rank, columns=["query"]).column("query").to_numpy()
        out["ranking"] = ranking(queries, split.labels.numpy(), scores, users=split.users.numpy())
    return out


def no_injection(runs: dict[str, dict]) -> tuple[dict, str | None]:
    """(the no_injection_test of the first of cora's and tallrec's metrics that has one, as a metrics dict;
    the method it came from, None when none has one)."""
    for method in NO_INJECTION_FROM:
        test = (runs.get(method) or {}).get("no_injection_test")
        if test:
            return {"test": test, "trainable_parameters": 0, "steps": 0}, method
    return {}, None


def side_metrics(metrics: dict) -> dict:
    """BDLM's domain model as a row: the bdlm run's domain_test and the store's size; its training is the run's."""
    return {"test": metrics.get("domain_test"), "trainable_parameters": metrics.get("domain_parameters"),
            "steps": None, "train_seconds": None, "samples_per_second": None}


def context_line(cfg: TrainConfig) -> str:
    budget = f"run.max_steps={cfg.run.max_steps}" if cfg.run.max_steps else "no run.max_steps"
    return (f"The test split of {cfg.data.data_dir}; CF model from {cfg.data.cf_dir}; LLM {cfg.llm.name}; "
            f"run.seed={cfg.run.seed}; run.epochs={cfg.run.epochs}, {budget}. Every LLM method was trained with "
            f"the same configs and overrides; the AUCs are of its best validation's model.")


# ---------------------------------------------------------------- the command

def compare(configs: list[str], methods_text: str, out: Path, overrides: list[str], overwrite: bool,
            command: str, source: tuple | None = None, versus: str | None = "auto") -> dict:
    """Check everything, train what is missing, write the report; returns the JSON summary. ``versus``: the
    row the others' differences are measured from ("auto": tallrec when it is a row; None: no differences)."""
    methods = parse_methods(methods_text)
    versus = check_versus(versus, methods)
    check_overrides(overrides)
    base = absolute_paths(load(TrainConfig, configs, overrides))   # the shared part: data, CF, seed, budget
    if "no-injection" in methods and not base.run.eval_baseline:
        raise CompareError("no-injection is the test score an LLM run takes before training, which "
                           "run.eval_baseline=false turns off: drop that setting, or drop no-injection from --methods")
    runs = plan(configs, overrides, methods, out, overwrite, source)
    notes = dict(NOTES)
    results = {}
    if "mf" in methods:                                    # before training: a bad CF_DIR fails fast
        results["mf"], notes["mf"] = cf_metrics(base)
        print(f"[compare] mf: the CF model's test metrics from {base.data.cf_dir} (not trained here)",
              file=sys.stderr)
    t0 = time.monotonic()
    for i, run in enumerate(runs, 1):
        execute(run, configs, overrides, i, len(runs))
        results[run.method] = json.loads((run.run_dir / "metrics.json").read_text())
    if runs:
        print(f"[compare] {len(runs)} run(s) ready in {_clock(time.monotonic() - t0)}", file=sys.stderr)
    if "no-injection" in methods:
        results["no-injection"], source = no_injection(results)
        if source is None:
            notes["no-injection"] = "not available: neither the cora nor the tallrec run scored it (run.eval_baseline)"
            print("[compare] no-injection: no run has no_injection_test; its row is empty", file=sys.stderr)
        else:
            notes["no-injection"] = notes["no-injection"].format(source=source)
    for side, run_of in SIDE_ROWS.items():
        if side in methods:
            results[side] = side_metrics(results[run_of])
            if not results[side]["test"]:
                notes[side] = (f"not available: the {run_of} run ended before a whole epoch (its domain phase runs "
                               f"after each whole epoch; this run took {results[run_of].get('steps')} steps): give "
                               f"run.max_steps at least one epoch's steps, or no run.max_steps")
                print(f"[compare] {side}: {notes[side]}", file=sys.stderr)
    rows = [row(m, results[m]) for m in methods]
    trained = {r.method: run_predictions(r.run_dir) for r in runs if r.method in methods}
    diffs = []
    if versus:
        frames = dict(trained)
        if "mf" in methods:
            frames["mf"] = cf_predictions(f"{base.data.cf_dir.rstrip('/')}/test_predictions.parquet",
                                          Path(base.data.data_dir))
        if frames.get(versus) is None:
            print(f"[compare] {versus} has no test predictions: no differences table", file=sys.stderr)
        else:
            diffs = paired_differences(frames, versus, methods)
    own = []
    for r in runs:                                  # each trained row against its own model before training
        before = run_predictions(r.run_dir, "untrained_test") if trained.get(r.method) is not None else None
        if before is not None:
            own += paired_differences({r.method: trained[r.method], UNTRAINED: before}, UNTRAINED, [r.method])
    return report(rows, out, command, context_line(base), notes, runs, diffs, versus, own)


def check_versus(versus: str | None, methods: list[str]) -> str | None:
    """The row differences are measured from: "auto" -> tallrec when it is a row (else none); "none" -> none."""
    if versus == "auto":
        return "tallrec" if "tallrec" in methods else None
    if versus in (None, "none"):
        return None
    if versus == "no-injection":
        raise CompareError("--versus no-injection: that row has no per-sample predictions (it is a score taken "
                           "inside another run); choose a trained row, mf, or none")
    if versus not in methods:
        raise CompareError(f"--versus {versus}: not one of the rows ({', '.join(methods)}); add it to --methods "
                           f"or choose one of them")
    return versus


def report(rows: list[dict], out: Path, command: str, context: str, notes: dict, runs: list[Run],
           diffs: list[dict] = (), versus: str | None = None, own: list[dict] = ()) -> dict:
    """``diffs``: each row against ``versus``; ``own``: each trained row against its own untrained model.
    Both go to compare.md and OUT/differences.csv (its ``versus`` column tells them apart)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "compare.csv", "md": out / "compare.md", "png": out / "compare.png"}
    write_csv(rows, files["csv"])
    extra = "\n".join(differences_markdown(d, v, BOOTSTRAP_REPS) for d, v in ((diffs, versus), (own, UNTRAINED)) if d)
    write_markdown(rows, files["md"], command, context, notes, extra)
    both = [*diffs, *own]
    if both:
        files["differences"] = out / "differences.csv"
        with open(files["differences"], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(both[0]))
            w.writeheader()
            w.writerows([{k: cell(v) for k, v in d.items()} for d in both])
    plot(rows, files["png"])
    print(f"\n{markdown_table(rows)}\n\n[compare] report: {', '.join(str(p) for p in files.values())}",
          file=sys.stderr, flush=True)
    return {"out": str(out), "files": {k: str(v) for k, v in files.items()}, "rows": rows, "differences": list(diffs),
            "against_untrained": list(own),
            "runs": {r.method: {"run_dir": str(r.run_dir), "action": r.action} for r in runs}}


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="train methods on the same data, CF model, seed and steps, and compare them",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, action="append",
                   help="YAML file (see configs/); repeat to layer files, as for `cora train`")
    p.add_argument("--methods", required=True, help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="report directory; OUT_DIR/<method> holds each run")
    p.add_argument("--overwrite", action="store_true",
                   help="train a run again (run.overwrite=true) when OUT_DIR/<method> holds one of another config")
    p.add_argument("--source-data", metavar="DIR", help="reccocktail rows: the source domains' prepared data (OUT/source "
                   "of `cora prepare --target-domain`), on which the base spirit (a tallrec run) trains")
    p.add_argument("--source-cf", metavar="CF_DIR", help="reccocktail rows: a CF run on --source-data")
    p.add_argument("--versus", default="auto", metavar="METHOD",
                   help="the row the others' test AUC/UAUC differences (with paired user-bootstrap intervals) are "
                        "measured from, in compare.md and differences.csv (default: tallrec when it is a row; none)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every method, e.g. run.max_steps=200")
    p.set_defaults(func=main)


def main(args) -> int:
    argv = [a for c in args.config for a in ("--config", c)] + ["--methods", args.methods, "--out", args.out]
    given = [x is not None for x in (args.source_data, args.source_cf)]
    if any(given) and not all(given):
        print("cora compare: error: --source-data and --source-cf go together (the base spirit's data and CF run)",
              file=sys.stderr)
        return 2
    source = (str(Path(args.source_data).absolute()), str(Path(args.source_cf).absolute())) if all(given) else None
    if source:
        argv += ["--source-data", args.source_data, "--source-cf", args.source_cf]
    if args.versus != "auto":
        argv += ["--versus", args.versus]
    command = shlex.join(["cora", "compare"] + argv + (["--overwrite"] if args.overwrite else []) + args.overrides)
    try:
        summary = compare(args.config, args.methods, Path(args.out), list(args.overrides), args.overwrite, command,
                          source, args.versus)
    except ConfigError as e:
        print(f"cora compare: {e}", file=sys.stderr)
        return 2
    except (CompareError, DatasetError) as e:
        print(f"cora compare: error: {e}", file=sys.stderr)
        return 2
    except TrainFailed as e:
        print(f"cora compare: error: {e}", file=sys.stderr)
        return 2 if e.code == 2 else 1
    print(json.dumps(summary, indent=1))
    return 0
