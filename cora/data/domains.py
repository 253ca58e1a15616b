"""Multi-domain preparation, for RecCocktail (a "base spirit" LoRA trained on source domains, an
"ingredient" LoRA on the target domain, then merged):

    cora prepare --source synthetic --domains movies,books,items --target-domain items --out OUT [...]
    cora prepare --source csv --input log.csv --columns user=..,item=..,timestamp=..,domain=category \\
                 [--domain-map Books=books,Movies_and_TV=movies] --target-domain books --out OUT

write two complete prepared directories, each with its own dataset.json, splits, shards and checksums:

    OUT/source   the samples of every domain but the target, mixed (in time order)
    OUT/target   the target domain's samples only

Every sample (split tables, shards) carries its ``domain``: the prompt template it is read with
(``Method.template`` + domain). A domain is a template name of ``cora/prompt_templates.json``.

What the two directories share: the users (users.parquet is the same file in both: a user has one
dense id everywhere), the label rule and the split boundaries (the time split is cut once, on all
domains' rows together, so both directories' train periods end at the same time). What each has of
its own: items (an item is a (domain, raw id) pair; dense ids 0..n-1 per directory; items.parquet
adds ``domain``), sample ids 0..n-1, and cold flags relative to its own train. A history holds the
user's earlier positives in the sample's own domain only (its prompt lists that domain's items).

Overlap removed: a source-domain row whose raw item id is also an item id of the target domain is
removed (reason ``target_item_overlap``), so no target item appears in OUT/source; target rows and
all users are kept. Each directory accounts for every input row: kept there, dropped for a reason,
or kept in the other directory (``other_directory``).

Synthetic domains share their structure, so what a model learns about users in the sources transfers
to the target: one planted factor vector and one arrival time per user (``u<k>``, drawn from
``numpy.random.default_rng(seed)`` as in single-domain data), the same label rule; per domain d, its
own items (``<d>-i<k>``: --items of them, and --interactions rows), their factors, the pairs, the noise,
times and titles, all drawn from ``default_rng([seed, zlib.crc32(d)])`` (a domain's draws do not
depend on which other domains are listed). Under ``--rule sequential`` (planted.py) a user's taste is
replayed per domain: the recent positives are those of the row's own domain, the ones its stored
history lists (a history is per domain, and so is its prompt; a rule reading other domains' positives
would plant a signal no sample shows), and the fallback before the first positive in a domain is the
user's shared factor, which carries what the sources tell about a user to the target. Titles follow
a per-domain pattern (TITLE_FORMATS), so the prompt text shows the domain. ``planted_factors`` recomputes the factors from a dataset.json.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..prompts import text_domains
from . import planted
from .accounting import Accounting
from .protocol import Prepared
from .schema import SPLITS, DatasetError
from .sources import RawData

PARTS = ("source", "target")
MULTI_SOURCES = ("synthetic", "csv", "parquet")

# How a synthetic item's title is written, per domain ({a} {b}: two words of cora.synthetic.WORDS,
# {year}: 1950 + 7k mod 70, {thing}: one of THINGS); other domains get OTHER_FORMAT.
TITLE_FORMATS = {"movies": "{a} {b} ({year})", "books": "{a} {b}: A Novel ({year})", "items": "{a} {b} {thing}"}
OTHER_FORMAT = "{a} {b} ({domain} {k})"
THINGS = "Lamp Backpack Mug Speaker Notebook Jacket Kettle Chair Watch Blender".split()

OVERLAP_RULE = ("rows of a source domain whose item id is also an item id of the target domain are removed "
                "from OUT/source (no target item appears there); all target rows and all users are kept")
SHARED = ("users (the same users.parquet: dense and raw ids), the label rule and the split boundaries (cut "
          "once on all domains' rows); per directory: items (an item is a (domain, raw id) pair), sample ids, "
          "cold flags relative to its own train; a history holds the user's earlier positives in the "
          "sample's own domain")


@dataclass
class Request:
    """The multi-domain flags of `cora prepare`, checked."""

    target: str
    """--target-domain: the domain written to OUT/target."""
    domains: list[str] | None
    """--domains (synthetic; sorted), or None: the values of the input's domain column."""
    domain_map: dict[str, str]
    """--domain-map: the input's domain values -> template domains (csv/parquet)."""


def _available() -> str:
    return ", ".join(text_domains())


def parse_domains(text: str) -> list[str]:
    """--domains 'movies,books,items' -> the sorted list, each a template domain, at least two."""
    names = [d.strip() for d in text.split(",") if d.strip()]
    unknown = [d for d in names if d not in text_domains()]
    if unknown:
        raise DatasetError(f"--domains {text!r}: {', '.join(map(repr, unknown))} is not a prompt domain; the "
                           f"domains are {_available()} (cora/prompt_templates.json); list two or more of them")
    twice = sorted({d for d in names if names.count(d) > 1})
    if twice:
        raise DatasetError(f"--domains {text!r} lists {', '.join(map(repr, twice))} more than once; list each "
                           f"domain once")
    if len(names) < 2:
        raise DatasetError(f"--domains {text!r} names {len(names)} domain(s); a multi-domain preparation needs a "
                           f"target and at least one source domain, e.g. --domains movies,books --target-domain "
                           f"books (domains: {_available()}); for one domain use --domain")
    return sorted(names)


def parse_domain_map(text: str | None) -> dict[str, str]:
    """--domain-map 'Books=books,Movies_and_TV=movies' -> {value: template domain}."""
    mapping = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        value, _, domain = (x.strip() for x in part.partition("="))
        if not value or domain not in text_domains():
            raise DatasetError(f"--domain-map entry {part!r}: expected VALUE=DOMAIN with DOMAIN one of "
                               f"{_available()}, e.g. --domain-map Books=books")
        mapping[value] = domain
    return mapping


def request(args) -> Request | None:
    """The checked multi-domain flags, or None for a single-domain preparation (none of them given)."""
    column = any(p.partition("=")[0].strip() == "domain" for p in (args.columns or "").split(","))
    if args.target_domain is None:
        for flag, given in (("--domains", args.domains), ("--domain-map", args.domain_map),
                            ("--columns domain=...", column)):
            if given:
                raise DatasetError(f"{flag} is for a multi-domain preparation, which writes OUT/source and "
                                   f"OUT/target: name the target domain with --target-domain (one of {_available()})")
        return None
    target = args.target_domain
    if args.source not in MULTI_SOURCES:
        raise DatasetError(f"--target-domain: --source {args.source} has one domain per dataset; multi-domain "
                           f"input is --source {', '.join(MULTI_SOURCES)} (csv/parquet with --columns domain=COLUMN)")
    if target not in text_domains():
        raise DatasetError(f"--target-domain {target!r} is not a prompt domain; the domains are {_available()} "
                           f"(cora/prompt_templates.json)")
    if args.domain is not None:
        raise DatasetError(f"--domain {args.domain} sets the one domain of a single-domain directory; with "
                           f"--target-domain each sample has its own domain: drop --domain")
    if args.source == "synthetic":
        if args.domain_map:
            raise DatasetError("--domain-map maps the values of a csv/parquet domain column; synthetic data takes "
                               "its domains from --domains: drop --domain-map")
        if not args.domains:
            raise DatasetError(f"--target-domain {target}: synthetic multi-domain data needs --domains, e.g. "
                               f"--domains movies,books,items --target-domain {target}")
        domains = parse_domains(args.domains)
        if target not in domains:
            raise DatasetError(f"--target-domain {target!r} is not in --domains {args.domains!r}; add it to "
                               f"--domains or choose one of {', '.join(domains)}")
        return Request(target, domains, {})
    if args.domains:
        raise DatasetError(f"--domains {args.domains!r} is for --source synthetic; a {args.source} input's domains "
                           f"are the values of its domain column (--columns domain=COLUMN)")
    return Request(target, None, parse_domain_map(args.domain_map))


# ----------------------------------------------------------------------------- synthetic

def domain_rng(seed: int, domain: str) -> np.random.Generator:
    """The stream of one domain's draws (item factors first)."""
    return np.random.default_rng([seed, zlib.crc32(domain.encode())])


def _title(domain: str, k: int, a: str, b: str, thing: str) -> str:
    fmt = TITLE_FORMATS.get(domain, OTHER_FORMAT)
    return fmt.format(a=a.title(), b=b.title(), year=1950 + (k * 7) % 70, thing=thing, domain=domain, k=k)


def synthetic_domains(spec, domains: list[str], acc: Accounting) -> RawData:
    """Planted multi-domain interactions (see the module doc); ``spec``: a checked prepare.SyntheticSpec,
    --items and --interactions per domain."""
    from ..synthetic import WORDS
    shared = np.random.default_rng(spec.seed)
    uf = shared.standard_normal((spec.users, spec.factors))
    span = spec.days * 86400
    arrival = (shared.random(spec.users) ** 2 * 0.9 * span).astype(np.int64)
    start = np.datetime64("2024-01-01T00:00:00", "s").astype(np.int64)
    frames, titles = [], {}
    for d in domains:
        rng = domain_rng(spec.seed, d)
        vf = rng.standard_normal((spec.items, spec.factors))
        pairs = rng.choice(spec.users * spec.items, spec.interactions, replace=False)
        user, item = pairs // spec.items, pairs % spec.items
        eps = rng.standard_normal(len(pairs))
        ts = start + arrival[user] + (rng.random(len(pairs)) * (span - arrival[user])).astype(np.int64)
        # rows in input order within the domain, so the sequential rule's recent positives are the
        # domain's: those the protocol puts in the sample's (per-domain) history
        label = planted.labels(spec.rule, uf, vf, user, item, ts, eps, spec.noise, spec.seed, spec.window)
        words, things = rng.choice(WORDS, (spec.items, 2)), rng.choice(THINGS, spec.items)
        titles.update({f"{d}-i{k}": _title(d, k, a, b, t) for k, ((a, b), t) in enumerate(zip(words, things))})
        frames.append(pd.DataFrame({"user": [f"u{u}" for u in user], "item": [f"{d}-i{i}" for i in item],
                                    "rating": np.nan, "label": label, "timestamp": ts, "domain": d}))
    frame = pd.concat(frames, ignore_index=True)
    frame["order"] = np.arange(len(frame), dtype=np.int64)
    acc.read(len(frame))
    return RawData(frame, titles, [], defaults={
        "label_rule": "label", "split": "time:0.8,0.1,0.1", "domain": None, "variant": "synthetic-domains"})


def planted_factors(manifest: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(user factors, {domain: item factors}) of a synthetic directory, from its dataset.json: row k is
    user ``u<k>`` / item ``<domain>-i<k>`` (raw ids in users.parquet / items.parquet). A single-domain
    directory (``cora prepare --source synthetic`` without --domains) gives {its domain: item factors}
    with row k item ``i<k>``: both drawn from default_rng(seed), the users first."""
    spec = manifest["options"]["synthetic"]
    if "domains" not in manifest["options"]:
        rng = np.random.default_rng(spec["seed"])
        uf = rng.standard_normal((spec["users"], spec["factors"]))
        return uf, {manifest["options"]["domain"]: rng.standard_normal((spec["items"], spec["factors"]))}
    uf = np.random.default_rng(spec["seed"]).standard_normal((spec["users"], spec["factors"]))
    return uf, {d: domain_rng(spec["seed"], d).standard_normal((spec["items"], spec["factors"]))
                for d in manifest["options"]["domains"]}


# ----------------------------------------------------------------------------- the input's domains

def resolve(raw: RawData, req: Request, column: str) -> list[str]:
    """Map the domain column's values through --domain-map (in place) and check them: every value a
    template domain, the target among them, at least one source domain. Returns the sorted domains."""
    mapped = raw.frame["domain"].map(lambda v: req.domain_map.get(v, v))
    found = sorted(mapped.unique())
    unknown = [v for v in found if v not in text_domains()]
    if unknown:
        shown = ", ".join(repr(v) for v in unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise DatasetError(f"domain column {column!r}: {shown} not a prompt domain; the domains are {_available()} "
                           f"(cora/prompt_templates.json); map each value with --domain-map VALUE=DOMAIN,... "
                           f"(e.g. --domain-map {unknown[0]}={text_domains()[0]})")
    if req.target not in found:
        raise DatasetError(f"--target-domain {req.target}: no row of the input has that domain (column {column!r} "
                           f"holds {', '.join(found)}); choose one of them")
    if len(found) < 2:
        raise DatasetError(f"domain column {column!r} holds only {found[0]!r}; a multi-domain preparation needs a "
                           f"target and at least one source domain (for one domain, drop --target-domain and "
                           f"domain= from --columns, and use --domain {found[0]})")
    raw.frame["domain"] = mapped
    return found


def remove_overlap(raw: RawData, target: str, acc: Accounting) -> dict:
    """Remove source rows whose raw item id is a target item (counted as target_item_overlap), then
    make every item the pair (domain, raw id): the frame's item becomes "<domain>:<raw id>" (split
    again by ``part``). Returns dataset.json's overlap record."""
    f = raw.frame
    is_target = (f["domain"] == target).to_numpy()
    target_items = pd.unique(f.loc[is_target, "item"])
    bad = ~is_target & f["item"].isin(target_items).to_numpy()
    acc.exclude("target_item_overlap", int(bad.sum()), "" if not bad.any() else
                f"item {f['item'][bad].iloc[0]!r} in domain {f['domain'][bad].iloc[0]!r} is also a {target} item")
    record = {"rule": OVERLAP_RULE, "removed_source_rows": int(bad.sum()),
              "removed_item_ids": int(f.loc[bad, "item"].nunique()), "target_items": len(target_items)}
    f = f[~bad].copy()
    keys = f["domain"] + ":" + f["item"]
    raw.titles = {k: raw.titles.get(i, f"item {i}") for k, i in zip(keys.unique(), f["item"][~keys.duplicated()])}
    f["item"] = keys
    raw.frame = f
    return record


# ----------------------------------------------------------------------------- the two directories

def part(prep: Prepared, domains: list[str], name: str) -> Prepared:
    """The rows of ``domains`` as a directory of their own: items renumbered in order of first appearance,
    sample ids 0..n-1 (time order kept), cold flags relative to this part's train; users shared."""
    f = prep.frame[prep.frame["domain"].isin(domains)].reset_index(drop=True)
    for split in SPLITS:
        if not (f["split"] == split).any():
            raise DatasetError(f"OUT/{name} (domains {', '.join(domains)}): split {split!r} is empty under the split "
                               f"rule {prep.boundaries}; widen it with --split, or give these domains more rows")
    codes, old = pd.factorize(f["item"].to_numpy())          # (n,) new id per row; old id per new id
    remap = np.full(len(prep.items), -1, dtype=np.int32)
    remap[old] = np.arange(len(old), dtype=np.int32)
    history = [remap[np.asarray(h, dtype=np.int64)] for h in f["history"]]
    if any((h < 0).any() for h in history):
        raise AssertionError(f"OUT/{name}: a history names an item outside its domains")
    user, item = f["user"].to_numpy(), codes.astype(np.int32)
    train = (f["split"] == "train").to_numpy()
    frame = f.assign(sample_id=np.arange(len(f), dtype=np.int64), item=item, history=history,
                     cold_user=~np.isin(user, user[train]), cold_item=~np.isin(item, item[train]))
    key = prep.items["raw_id"].to_numpy(dtype=object)[old]
    items = pd.DataFrame({"item": np.arange(len(old), dtype=np.int32),
                          "raw_id": [k.partition(":")[2] for k in key],
                          "title": prep.items["title"].to_numpy(dtype=object)[old],
                          "domain": [k.partition(":")[0] for k in key]})
    return Prepared(frame, prep.users, items, prep.boundaries)


def part_counts(acc: Accounting, here: Prepared, other: Prepared, other_name: str) -> dict:
    """dataset.json's accounting of one directory: the input's, with the other directory's rows counted
    as other_directory, so input_rows == kept + sum(dropped) holds here too."""
    mine = copy.deepcopy(acc)
    mine.exclude("other_directory", len(other.frame),
                 f"{len(other.frame)} rows of {', '.join(sorted(other.frame['domain'].unique()))} in OUT/{other_name}")
    return mine.check(len(here.frame))


def domain_counts(frame: pd.DataFrame) -> dict:
    """Per domain: rows, positives, users, items (all splits)."""
    return {d: {"rows": len(g), "positives": int(g["label"].sum()), "users": int(g["user"].nunique()),
                "items": int(g["item"].nunique())} for d, g in frame.groupby("domain", sort=True)}
