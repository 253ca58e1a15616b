"""``cora prepare``: any supported input -> a versioned, verifiable data directory (see schema.py).

    cora prepare --source movielens --input ml-1m/ --out data/ml1m
    cora prepare --source csv --input log.csv --out data/mine --columns user=uid,item=sku,rating=stars,timestamp=ts
    cora prepare --source synthetic --out data/synth --users 2000 --items 1000 --interactions 100000
    cora prepare --source synthetic --rule sequential --window 5 --out data/seq   # taste = recent positives
    cora prepare --source movielens --input ml-1m/ --out data/ml1m --rank-negatives 99 --seed 0
    cora prepare --source synthetic --domains movies,books,items --target-domain items --out data/cocktail
    cora prepare --source csv --input log.csv --out data/cocktail2 \
                 --columns user=uid,item=sku,rating=stars,timestamp=ts,title=name,domain=category \
                 --domain-map Books=books,Movies_and_TV=movies --target-domain books

--rank-negatives N adds the rank split: each test positive with N negatives the user never interacted
with, drawn from --seed (see cora/data/candidates.py).

--target-domain D (multi-domain data, for RecCocktail) writes two prepared directories, OUT/source (the
other domains' samples, mixed) and OUT/target (D's samples), with shared users and a per-sample domain
(see cora/data/domains.py); --rank-negatives then applies to OUT/target only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import candidates, domains, planted, protocol, sources
from .accounting import Accounting
from .schema import SCHEMA_VERSION, DatasetError
from ..fileio import exists, is_remote, join, read_bytes, sha256, write_atomically
from .write import publish, write_dataset

SOURCES = ("movielens", "collm", "parquet", "csv", "synthetic")


@dataclass
class SyntheticSpec:
    """Planted-factor interactions: label = 1[s + noise * eps > 0] (see cora/data/planted.py), with
    s = u.v / sqrt(factors) (rule 'dot'), (u.w_u + v.w_v) / sqrt(2 factors) (rule 'additive': user
    and item propensities along fixed directions), or, rule 'sequential', s_t = v_t . m_t / |m_t| with
    m_t the mean factor of the user's last ``window`` positives before t (time order, ties by input
    order; the user's own factor u while there is none): each user's rows are replayed in time order
    and a row's label decides whether its item joins the recent positives, so what a user likes next
    depends on what they liked recently, and the last ``window`` items of a sample's stored history
    are the ones its label was drawn from (with --history-stored >= window and a split that drops no
    rows, as the default time split). With --domains, the recent positives are those of the sample's
    own domain, the ones its stored history holds; the fallback u is shared by all domains.
    Each user arrives at a random time (skewed early) and interacts uniformly from then on; the
    users, items, pairs, times and titles are the same draws under every rule (only labels differ)."""

    users: int = 1000
    """Number of users (shared by all domains of a multi-domain dataset)."""
    items: int = 500
    """Number of items (per domain, with --domains)."""
    interactions: int = 50_000
    """Number of (user, item) interactions, all distinct pairs (per domain, with --domains)."""
    factors: int = 16
    """Size of the planted latent factors."""
    noise: float = 0.3
    """Label noise (std of the Gaussian added to the score)."""
    rule: str = "dot"
    """How labels depend on the factors: 'dot' (the MF view), 'additive' (propensities) or
    'sequential' (the mean of the user's recent positives)."""
    window: int = 5
    """Rule 'sequential' only: how many of the user's most recent positives make up their taste."""
    days: int = 365
    """Time span of the timestamps (from 2024-01-01 UTC)."""
    seed: int = 0
    """Everything is drawn from this seed (the same spec gives byte-identical output)."""


def check_spec(spec: SyntheticSpec) -> None:
    if min(spec.users, spec.items, spec.interactions, spec.factors, spec.days) < 1:
        raise DatasetError(f"synthetic sizes must be >= 1, got {asdict(spec)}")
    if spec.rule not in planted.RULES:
        raise DatasetError(f"--rule {spec.rule!r} is not a synthetic rule; use {', '.join(planted.RULES)}")
    if spec.window < 1:
        raise DatasetError(f"--window {spec.window}: the sequential rule averages the user's last --window "
                           f"positives, so it must be >= 1; use e.g. --window {SyntheticSpec.window}")
    if spec.interactions > spec.users * spec.items:
        raise DatasetError(f"--interactions {spec.interactions} exceeds users x items = "
                           f"{spec.users * spec.items} distinct pairs")


def synthetic_spec(args) -> SyntheticSpec:
    """The SyntheticSpec of `cora prepare`'s flags; --window (None when not given) only with --rule
    sequential, whose histories must hold the positives the rule used."""
    if args.window is not None and args.rule != "sequential":
        raise DatasetError(f"--window {args.window} is for --rule sequential (the number of recent positives "
                           f"that make up a user's taste); --rule {args.rule} does not use it: drop --window")
    spec = SyntheticSpec(**{k: getattr(args, k) for k in SyntheticSpec.__dataclass_fields__ if k != "window"},
                         **({} if args.window is None else {"window": args.window}))
    check_spec(spec)
    if spec.rule == "sequential" and args.history_stored < spec.window:
        raise DatasetError(f"--history-stored {args.history_stored} is below --window {spec.window}: the samples "
                           f"would not hold the recent positives the sequential rule drew their labels from; use "
                           f"--history-stored {spec.window} or more (default 50)")
    return spec


def spec_record(spec: SyntheticSpec) -> dict:
    """dataset.json's (and the fingerprint's) record of a spec: every field; window only for the
    sequential rule (directories of the static rules keep their fingerprint)."""
    record = asdict(spec)
    if spec.rule != "sequential":
        del record["window"]
    return record


def synthetic(spec: SyntheticSpec, acc: Accounting) -> sources.RawData:
    from ..synthetic import WORDS
    check_spec(spec)
    rng = np.random.default_rng(spec.seed)
    uf = rng.standard_normal((spec.users, spec.factors))
    vf = rng.standard_normal((spec.items, spec.factors))
    pairs = rng.choice(spec.users * spec.items, spec.interactions, replace=False)
    user, item = pairs // spec.items, pairs % spec.items
    eps = rng.standard_normal(len(pairs))      # 'additive' draws its directions from a stream of its own
    # each user arrives at some time and is active from then on, so late users are cold in valid/test
    span = spec.days * 86400
    arrival = (rng.random(spec.users) ** 2 * 0.9 * span).astype(np.int64)
    start = np.datetime64("2024-01-01T00:00:00", "s").astype(np.int64)
    ts = start + arrival[user] + (rng.random(len(pairs)) * (span - arrival[user])).astype(np.int64)
    label = planted.labels(spec.rule, uf, vf, user, item, ts, eps, spec.noise, spec.seed, spec.window)
    acc.read(len(pairs))
    frame = pd.DataFrame({"user": [f"u{u}" for u in user], "item": [f"i{i}" for i in item],
                          "rating": np.nan, "label": label, "timestamp": ts,
                          "order": np.arange(len(pairs))})
    words = rng.choice(WORDS, (spec.items, 2))
    titles = {f"i{i}": f"{a.title()} {b.title()} ({1950 + (i * 7) % 70})" for i, (a, b) in enumerate(words)}
    return sources.RawData(frame, titles, [], defaults={
        "label_rule": "label", "split": "time:0.8,0.1,0.1", "domain": "items", "variant": "synthetic"})


def read_source(args, acc: Accounting, multi: domains.Request | None = None) -> sources.RawData:
    """The raw interactions; ``multi``: a multi-domain preparation (rows carry their domain)."""
    if args.source == "synthetic":
        spec = synthetic_spec(args)
        if multi is not None:
            return domains.synthetic_domains(spec, multi.domains, acc)
        return synthetic(spec, acc)
    if args.input is None:
        raise DatasetError(f"--source {args.source} needs --input PATH")
    path = Path(args.input)
    if not path.exists():
        raise DatasetError(f"--input {path} does not exist")
    if args.source == "movielens":
        return sources.read_movielens(path, acc)
    if args.source == "collm":
        return sources.read_collm(path, acc, args.allow_pickle,
                                  {s: getattr(args, f"{s}_file", None) for s in ("train", "valid", "test")})
    return sources.read_tabular(path, args.source, acc, args.columns, args.time_unit, domain=multi is not None)


def _options(args, defaults: dict, multi: bool = False) -> dict:
    opts = {"source": args.source, "label_rule": args.label_rule or defaults["label_rule"],
            "split": args.split or defaults["split"], "domain": args.domain or defaults["domain"],
            "history_stored": args.history_stored, "history_in_prompt": args.history_in_prompt,
            "samples_per_shard": args.samples_per_shard, "on_bad_row": args.on_bad_row}
    if args.source in ("parquet", "csv"):
        opts.update(columns=sources.parse_columns(args.columns, domain=multi), time_unit=args.time_unit)
    if args.source == "synthetic":
        opts["synthetic"] = spec_record(synthetic_spec(args))
    if args.rank_negatives:             # absent otherwise: directories prepared before keep their fingerprint
        opts["rank"] = {"negatives": args.rank_negatives, "seed": args.seed}
    return opts


def _domain_options(args, defaults: dict, req: domains.Request, found: list[str]) -> dict:
    """A multi-domain preparation's options: the single-domain ones without "domain", plus the domains."""
    opts = _options(args, defaults, multi=True)
    del opts["domain"]
    opts.update(domains=found, target_domain=req.target)
    if args.source in ("parquet", "csv"):
        opts["domain_map"] = req.domain_map
    return opts


def _check_out(out: Path | str, fingerprint: str, overwrite: bool) -> dict | None:
    """The existing dataset.json when ``out`` already holds this exact dataset; raise when it holds
    something else (unless overwrite)."""
    if isinstance(out, str):                 # object storage
        return _check_remote_out(out, fingerprint, overwrite)
    if not out.exists() or not any(out.iterdir()):
        return None
    existing = out / "dataset.json"
    if existing.is_file():
        old = json.loads(existing.read_text())
        if old.get("fingerprint") == fingerprint:
            return old
    if not overwrite:
        what = "a different dataset" if existing.is_file() else "other files"
        raise DatasetError(f"--out {out} already holds {what}; choose another --out, or pass --overwrite "
                           f"to replace it")
    return None


def _check_remote_out(out: str, fingerprint: str, overwrite: bool) -> dict | None:
    """_check_out for an object-storage --out."""
    try:
        old = json.loads(read_bytes(join(out, "dataset.json")))
        if old.get("fingerprint") == fingerprint:
            return old
        what = "a different dataset"
    except FileNotFoundError:
        if not exists(out):
            return None
        what = "other files (or an incomplete upload: no dataset.json)"
    except OSError as e:
        raise DatasetError(f"--out {out}: cannot read it ({type(e).__name__}: {e}); check the URI, the endpoint "
                           f"(CORA_S3_ENDPOINT) and the storage credentials") from None
    if not overwrite:
        raise DatasetError(f"--out {out} already holds {what}; choose another --out, or pass --overwrite to "
                           f"replace it")
    return None


def prepare(args, progress: bool = True) -> dict:
    """Run the whole pipeline; returns dataset.json's content ({"source": ..., "target": ...} for a
    multi-domain preparation)."""
    t0 = time.time()
    remote = is_remote(args.out)
    out = args.out.rstrip("/") if remote else Path(args.out.removeprefix("file://"))
    _validate(args)
    req = domains.request(args)
    if req is not None:
        if remote:
            raise DatasetError(f"--out {args.out}: a multi-domain preparation (--target-domain) is written to a "
                               f"local directory only; prepare it locally, then copy OUT/source and OUT/target")
        return prepare_domains(args, req, progress)
    acc = Accounting(args.on_bad_row)
    raw = read_source(args, acc)
    opts = _options(args, raw.defaults)
    inputs = [{"file": str(p), "bytes": p.stat().st_size, "sha256": sha256(p)} for p in raw.inputs]
    fingerprint = hashlib.sha256(json.dumps([[i["sha256"] for i in inputs], opts],
                                            sort_keys=True).encode()).hexdigest()
    done = _check_out(out, fingerprint, args.overwrite)
    if done is not None:
        print(f"[prepare] {out} already holds this dataset (same inputs and options); nothing to do",
              file=sys.stderr)
        return done
    prep = protocol.apply(raw, acc, opts["label_rule"], opts["split"], args.history_stored)
    counts = acc.check(len(prep.frame))
    rank, rank_record = None, None
    if args.rank_negatives:
        rank, rank_record = candidates.rank_split(prep.frame, len(prep.items), args.rank_negatives, args.seed)
    if raw.item_file:
        counts["item_file"] = raw.item_file
    manifest = _manifest(args, raw, opts, inputs, fingerprint, counts)
    if rank is not None:
        manifest["rank"] = rank_record
    write = dict(samples_per_shard=args.samples_per_shard, history_in_prompt=args.history_in_prompt,
                 overwrite=args.overwrite, progress=progress, rank=rank)
    if remote:                               # written locally, then uploaded with dataset.json last
        import tempfile
        with tempfile.TemporaryDirectory(prefix="cora-prepare-") as tmp:
            manifest = write_dataset(prep, Path(tmp, "data"), manifest, **write)
            publish(Path(tmp, "data"), out)
    else:
        manifest = write_dataset(prep, out, manifest, **write)
    print(f"[prepare] wrote {out}: " + ", ".join(f"{s} {c['rows']}" for s, c in manifest["counts"]["splits"].items())
          + f"; dropped {counts['dropped'] or 'none'}; {time.time() - t0:.1f}s", file=sys.stderr)
    return manifest


def _manifest(args, raw: sources.RawData, opts: dict, inputs: list, fingerprint: str, counts: dict) -> dict:
    return {"schema_version": SCHEMA_VERSION, "source": args.source,
            "variant": raw.defaults.get("variant"), "domain": opts.get("domain"), "fingerprint": fingerprint,
            "inputs": inputs, "options": opts, "label_rule": opts["label_rule"], "split_rule": opts["split"],
            "history_stored": args.history_stored, "history_in_prompt": args.history_in_prompt,
            "samples_per_shard": args.samples_per_shard, "counts": counts,
            "id_maps": {"users": "users.parquet", "items": "items.parquet"}}


def _check_pair(out: Path, fingerprints: dict, overwrite: bool) -> dict | None:
    """Like _check_out, for OUT of a multi-domain preparation: {part: dataset.json} when OUT holds exactly
    this source/target pair already."""
    if not out.exists() or not any(out.iterdir()):
        return None
    old = {}
    for name in domains.PARTS:
        path = out / name / "dataset.json"
        old[name] = json.loads(path.read_text()) if path.is_file() else {}
    if sorted(p.name for p in out.iterdir()) == sorted(domains.PARTS) and \
            all(old[n].get("fingerprint") == fingerprints[n] for n in domains.PARTS):
        return old
    if not overwrite:
        raise DatasetError(f"--out {out} already holds something else than this source/target pair; choose another "
                           f"--out, or pass --overwrite to replace it")
    return None


def prepare_domains(args, req: domains.Request, progress: bool) -> dict:
    """A multi-domain preparation (see domains.py): OUT/source and OUT/target, written together
    (OUT is renamed into place when both are complete); returns {part: dataset.json}."""
    t0, out = time.time(), Path(args.out)
    acc = Accounting(args.on_bad_row)
    raw = read_source(args, acc, req)
    found = req.domains or domains.resolve(raw, req, sources.parse_columns(args.columns, domain=True)["domain"])
    overlap = domains.remove_overlap(raw, req.target, acc)
    opts = _domain_options(args, raw.defaults, req, found)
    inputs = [{"file": str(p), "bytes": p.stat().st_size, "sha256": sha256(p)} for p in raw.inputs]
    fingerprints = {n: hashlib.sha256(json.dumps([[i["sha256"] for i in inputs], opts, n], sort_keys=True).encode())
                    .hexdigest() for n in domains.PARTS}
    done = _check_pair(out, fingerprints, args.overwrite)
    if done is not None:
        print(f"[prepare] {out} already holds this source/target pair (same inputs and options); nothing to do",
              file=sys.stderr)
        return done
    prep = protocol.apply(raw, acc, opts["label_rule"], opts["split"], args.history_stored)
    dropped = acc.check(len(prep.frame))["dropped"]
    sources_ = [d for d in found if d != req.target]
    parts = {"source": domains.part(prep, sources_, "source"), "target": domains.part(prep, [req.target], "target")}
    manifests = {}

    def write(tmp: Path) -> None:
        for name, here in parts.items():
            other = "target" if name == "source" else "source"
            held = sources_ if name == "source" else [req.target]
            m = _manifest(args, raw, opts, inputs, fingerprints[name], domains.part_counts(acc, here, parts[other], other))
            m.update(domain=held[0] if len(held) == 1 else None, domains=held)
            m["counts"]["domains"] = domains.domain_counts(here.frame)
            m["multi_domain"] = _multi_record(args, name, other, req, found, overlap)
            rank = None
            if name == "target" and args.rank_negatives:
                rank, m["rank"] = candidates.rank_split(here.frame, len(here.items), args.rank_negatives, args.seed)
            manifests[name] = write_dataset(here, tmp / name, m, samples_per_shard=args.samples_per_shard,
                                            history_in_prompt=args.history_in_prompt, overwrite=False,
                                            progress=progress, rank=rank)

    write_atomically(out, write)
    for name, m in manifests.items():
        print(f"[prepare] wrote {out / name} ({', '.join(m['domains'])}): " + ", ".join(
            f"{s} {c['rows']}" for s, c in m["counts"]["splits"].items()), file=sys.stderr)
    print(f"[prepare] dropped {dropped or 'none'}; {time.time() - t0:.1f}s", file=sys.stderr)
    return manifests


def _multi_record(args, name: str, other: str, req: domains.Request, found: list[str], overlap: dict) -> dict:
    """dataset.json's "multi_domain": which part this is, what the parts share, what was removed."""
    record = {"part": name, "other_part": f"../{other}", "target_domain": req.target,
              "source_domains": [d for d in found if d != req.target], "all_domains": found,
              "overlap": overlap, "shared": domains.SHARED,
              "rank_split": "OUT/target only" if args.rank_negatives else None}
    if args.source == "synthetic":
        record["synthetic"] = {
            "seed": args.seed, "users": args.users, "factors": args.factors, "rule": args.rule, "noise": args.noise,
            **({"window": synthetic_spec(args).window} if args.rule == "sequential" else {}),
            "days": args.days, "items_per_domain": args.items, "interactions_per_domain": args.interactions,
            "draws": "user factors and arrival times: numpy.random.default_rng(seed); per domain d: item factors, "
                     "pairs, noise, times and titles: numpy.random.default_rng([seed, zlib.crc32(d)])",
            "titles": {d: domains.TITLE_FORMATS.get(d, domains.OTHER_FORMAT) for d in found}}
    return record


def _validate(args) -> None:
    problems = [f"--{k.replace('_', '-')} must be >= {lo}, got {getattr(args, k)}"
                for k, lo in (("samples_per_shard", 1), ("history_stored", 0), ("history_in_prompt", 0),
                              ("rank_negatives", 0))
                if getattr(args, k) < lo]
    if args.history_in_prompt > args.history_stored:
        problems.append(f"--history-in-prompt {args.history_in_prompt} exceeds --history-stored "
                        f"{args.history_stored}")
    if args.source not in SOURCES:
        problems.append(f"--source {args.source!r}: accepted {', '.join(SOURCES)}")
    if problems:
        raise DatasetError("; ".join(problems))


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="turn interaction data into a prepared data directory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--input", help="file or directory to read (not for synthetic)")
    p.add_argument("--out", required=True, help="the data directory to create: a path, or s3://, gs:// (uploaded with "
                                                "dataset.json last)")
    p.add_argument("--domain", choices=["movies", "books", "items"], help="prompt template domain")
    p.add_argument("--target-domain", metavar="DOMAIN",
                   help="multi-domain data: write OUT/source (the other domains) and OUT/target (this one)")
    p.add_argument("--domains", metavar="D1,D2,...",
                   help="synthetic multi-domain data: the domains (with --target-domain), e.g. movies,books,items")
    p.add_argument("--domain-map", metavar="VALUE=DOMAIN,...",
                   help="csv/parquet multi-domain data: map the domain column's values to prompt domains")
    p.add_argument("--label-rule", help="rating>=4 (MovieLens default), rating==5, ..., or label")
    p.add_argument("--split", help="months:A-B,C-D,E-F | time:F1,F2,F3 | given (see README)")
    p.add_argument("--columns", help="parquet/csv column mapping, e.g. user=uid,item=iid,rating=r,timestamp=t,title=name "
                                     "(+ domain=COLUMN with --target-domain)")
    p.add_argument("--time-unit", default="s", choices=list(sources.TIME_UNITS), help="unit of numeric timestamps")
    p.add_argument("--history-stored", type=int, default=50, help="earlier positives kept per sample")
    p.add_argument("--history-in-prompt", type=int, default=10, help="most recent titles used in prompts")
    p.add_argument("--samples-per-shard", type=int, default=10_000)
    p.add_argument("--on-bad-row", choices=["drop", "error"], default="drop",
                   help="drop (and count) unreadable rows, or stop at the first")
    p.add_argument("--allow-pickle", action="store_true", help="read CoLLM .pkl files (runs code from them)")
    for split in ("train", "valid", "test"):
        p.add_argument(f"--{split}-file", metavar="NAME",
                       help=f"collm: the {split} file in --input (default: the only one, or the full split "
                            f"beside CoLLM's subsets, e.g. valid_ood2.pkl rather than valid_small_ood2.pkl)")
    p.add_argument("--rank-negatives", type=int, default=0, metavar="N",
                   help="also write the rank split: each test positive with N negatives the user never "
                        "interacted with, drawn from --seed (0: no rank split)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, different --out")
    p.add_argument("--no-progress", action="store_true")
    helps = {"seed": "synthetic: seed; also seeds the --rank-negatives draws",
             "rule": f"synthetic: how labels arise: {', '.join(planted.RULES)} (see SyntheticSpec)",
             "window": f"synthetic, --rule sequential: the user's last N positives that make up their taste "
                       f"(default {SyntheticSpec.window}; --history-stored must be >= N)"}
    for name, f in SyntheticSpec.__dataclass_fields__.items():
        p.add_argument(f"--{name}", type=type(f.default), default=None if name == "window" else f.default,
                       metavar="N" if name == "window" else None, help=helps.get(name, f"synthetic: {name}"))
    p.set_defaults(func=run)


def run(args) -> int:
    manifest = prepare(args, progress=not args.no_progress)
    summary = lambda m: {"counts": m["counts"], "num_users": m["num_users"], "num_items": m["num_items"]}  # noqa: E731
    if set(manifest) == set(domains.PARTS):                 # a multi-domain preparation: {part: dataset.json}
        print(json.dumps({"out": str(args.out), **{n: dict(summary(m), domains=m["domains"])
                                                   for n, m in manifest.items()}}, indent=1))
    else:
        print(json.dumps({"out": str(args.out), **summary(manifest)}, indent=1))
    return 0
