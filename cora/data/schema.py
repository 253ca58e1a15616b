"""The prepared data directory: what ``cora prepare`` writes and every later stage reads.

    DATA_DIR/
      dataset.json              schema version, source, rule, counts (every input row accounted for),
                                split boundaries, shard lists, sha256 of every file below
      train.parquet             one row per sample, columns INTERACTIONS, sorted by timestamp
      valid.parquet
      test.parquet
      rank.parquet              only with --rank-negatives N: each test positive with N sampled negatives,
                                columns RANK = INTERACTIONS + query (see candidates.py)
      items.parquet             item (dense id), raw_id (the source's id, as text), title (+ domain)
      users.parquet             user (dense id), raw_id
      shards/<split>-NNNNNN.tar WebDataset shards of the same samples (SHARD_FIELDS, as one .json
                                member per sample, key = the zero-padded sample_id; rank shards
                                add "query")

Dense ids are 0..n-1 in order of first appearance in time; ``sample_id`` is unique across splits.
``history`` holds the user's earlier positive items (most recent last, at most ``history_stored``);
prompts use the last ``history_in_prompt`` of them. ``cold_user`` / ``cold_item``: the user / item has
no interaction in train; a sample is warm when neither is true.

A directory of a multi-domain preparation (``cora prepare --target-domain``, see domains.py) adds a
``domain`` column (string) to every split table and to items.parquet, and "domain" to every shard
sample: the prompt template of that sample. Its dataset.json lists them in "domains" ("domain" is
the one domain when there is one, else null); ``manifest_domains`` reads either kind of directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = 1
SPLITS = ("train", "valid", "test")
RANK_SPLIT = "rank"                  # optional; readers of SPLITS never see it

INTERACTIONS = pa.schema([
    ("sample_id", pa.int64()),
    ("user", pa.int32()),
    ("item", pa.int32()),
    ("label", pa.int8()),
    ("rating", pa.float32()),        # null when the source has only labels
    ("timestamp", pa.int64()),       # unix seconds, UTC
    ("history", pa.list_(pa.int32())),
    ("cold_user", pa.bool_()),
    ("cold_item", pa.bool_()),
])
RANK = INTERACTIONS.append(pa.field("query", pa.int64()))      # query = sample_id of the test positive
ITEMS = pa.schema([("item", pa.int32()), ("raw_id", pa.string()), ("title", pa.string())])
DOMAIN = pa.field("domain", pa.string())   # multi-domain directories only: appended to the schemas above
USERS = pa.schema([("user", pa.int32()), ("raw_id", pa.string())])

# Fields of one WebDataset sample (the member "<key>.json"): enough to build the prompt and look up
# the CF embeddings without any other table.
SHARD_FIELDS = ("sample_id", "user", "item", "label", "timestamp", "history", "title",
                "history_titles", "cold_user", "cold_item")


def with_domain(schema: pa.Schema) -> pa.Schema:
    """``schema`` of a multi-domain directory's table (the per-sample or per-item domain appended)."""
    return schema.append(DOMAIN)


def manifest_domains(manifest: dict) -> list[str]:
    """The prompt domains a prepared directory holds: dataset.json's "domains", or its one "domain"."""
    return list(manifest.get("domains") or [manifest["domain"]])


class DatasetError(ValueError):
    """A data directory or input that cannot be used; the message names the value and the fix."""


def read_manifest(data_dir: str | Path) -> dict:
    """dataset.json of a prepared directory (a path, or an s3://, gs://, file:// URI), with a clear error
    when it is not one. In object storage a directory is complete only once its dataset.json is there
    (`cora prepare --out URI` uploads it last)."""
    from cora.fileio import exists, join, read_bytes
    path = join(str(data_dir), "dataset.json")
    try:
        manifest = json.loads(read_bytes(path))
    except FileNotFoundError:
        if all(exists(join(str(data_dir), p, "dataset.json")) for p in ("source", "target")):
            raise DatasetError(f"{data_dir} holds a multi-domain preparation (cora prepare --target-domain), not one "
                               f"data directory; use {join(str(data_dir), 'source')} (the source domains) or "
                               f"{join(str(data_dir), 'target')} (the target domain)") from None
        raise DatasetError(f"{data_dir} is not a prepared data directory (no dataset.json); "
                           f"create it with `cora prepare --source ... --out {data_dir}`") from None
    except OSError as e:
        raise DatasetError(f"cannot read {path} ({type(e).__name__}: {e}); check the URI, the endpoint "
                           f"(CORA_S3_ENDPOINT) and this machine's storage credentials") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); prepare the data again") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetError(f"{path} has schema_version {version!r}; this version of cora reads "
                           f"{SCHEMA_VERSION}: prepare the data again")
    return manifest
