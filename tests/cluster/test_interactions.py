"""InteractionShard actors: exactly-once across ranks, resume from a cursor, metrics, bad input."""

import json
import time
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from cluster import plan, runtime
from cluster.client import BatchIterator
from cluster.embeddings import start_embedding_servers
from cluster.interactions import DataError, InteractionShard, start_interaction_shards

BATCH = 32


def _actors(data_dir, client, world=2, split="train", **kw):
    return start_interaction_shards(str(data_dir), split, world, embeddings=client, batch_size=BATCH, seed=7,
                                    num_cpus=0.1, max_length=256, prefetch=3, **kw)


def _run(actors, epoch, steps=None, cursors=None):
    """Drive all ranks in lockstep (as the trainer does); returns per-rank batches and iterators."""
    its = [BatchIterator(a, epoch, None if cursors is None else cursors[r]) for r, a in enumerate(actors)]
    assert len({len(it) for it in its}) == 1                         # every rank runs the same steps
    out = [[] for _ in actors]
    for k, batches in enumerate(zip(*its)):
        for r, b in enumerate(batches):
            out[r].append(b)
        if steps is not None and k + 1 == steps:
            break
    return out, its


def _ids(batches):
    return [int(i) for b in batches for i, w in zip(b["sample_ids"], b["weights"]) if w > 0]


@pytest.fixture(scope="module")
def served(ray_local, cf_dir):
    out, users, items = cf_dir
    return start_embedding_servers(str(out), shards=2, dim=8, num_cpus=0.1), users, items


def test_two_ranks_see_every_sample_exactly_once(served, data_dir):
    client, users, items = served
    actors = _actors(data_dir, client)
    per_rank, its = _run(actors, epoch=0)
    seen = _ids(per_rank[0]) + _ids(per_rank[1])
    want = pq.read_table(data_dir / "train.parquet").column("sample_id").to_pylist()
    assert sorted(seen) == sorted(want) and len(want) % (2 * BATCH) != 0  # a remainder exists
    b = per_rank[0][0]
    assert b["input_ids"].shape[0] == BATCH == len(b["lengths"])
    assert (b["input_ids"][np.arange(BATCH), b["lengths"] - 1] != 0).all()  # answer token last, right-padded
    np.testing.assert_array_equal(b["user_emb"], users[b["users"]])
    train = pq.read_table(data_dir / "train.parquet").to_pandas().set_index("sample_id")
    np.testing.assert_array_equal(b["item_emb"], items[train.loc[b["sample_ids"], "item"].to_numpy()])
    np.testing.assert_array_equal(b["labels"], train.loc[b["sample_ids"], "label"].to_numpy())
    for it, batches in zip(its, per_rank):                          # one measured wait per batch handed over
        assert len(it.waits) == len(batches) and all(w > 0 for w in it.waits)
        assert it.wait_seconds == pytest.approx(sum(it.waits))
    assert all(0 < b["lookup_s"] < 5 for b in per_rank[0])          # the batch's lookup time, measured
    again, _ = _run(actors, epoch=1)
    assert _ids(again[0]) != _ids(per_rank[0])                       # a new shuffle per epoch
    for a in actors:
        ray.kill(a)


def test_resume_from_cursor_continues_with_exactly_the_unseen_samples(served, data_dir):
    client, _, _ = served
    actors = _actors(data_dir, client)
    full, _ = _run(actors, epoch=3)
    head, its = _run(actors, epoch=3, steps=4)
    cursors = [plan.Cursor.from_dict(json.loads(json.dumps(it.cursor().to_dict()))) for it in its]
    for a in actors:                                                 # tear everything down
        ray.kill(a)
    fresh = _actors(data_dir, client)
    tail, _ = _run(fresh, epoch=3, cursors=cursors)
    for r in range(2):
        assert _ids(head[r]) + _ids(tail[r]) == _ids(full[r])        # same samples, same order
    with pytest.raises(ValueError, match="world_size was 2, now 1"):
        BatchIterator(_actors(data_dir, client, world=1)[0], 3, cursors[0])


def test_metrics_reach_the_prometheus_endpoint(served, data_dir):
    client, _, _ = served
    actors = _actors(data_dir, client)
    _run(actors, epoch=0)
    want = {"ray_cora_embedding_lookups_total", "ray_cora_embedding_lookup_latency_s_count",
            "ray_cora_embedding_lookup_rate", "ray_cora_prefetch_depth", "ray_cora_samples_per_second",
            "ray_cora_samples_produced_total"}
    seen_names = set()
    values: dict[str, float] = {}
    deadline = time.time() + 60
    while time.time() < deadline and not (want <= set(values) and all(values[k] > 0 for k in want - {"ray_cora_prefetch_depth"})):
        values = {}
        for url in runtime.metrics_urls():
            for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
                name = line.split("{")[0].split(" ")[0]
                if "cora" in name:
                    seen_names.add(name)
                if name in want and not line.startswith("#"):
                    values[name] = max(values.get(name, 0.0), float(line.rsplit(" ", 1)[1]))
        time.sleep(2)
    assert want <= set(values), f"missing {want - set(values)}; found {seen_names}"
    assert values["ray_cora_embedding_lookups_total"] > 0 and values["ray_cora_samples_produced_total"] > 0
    assert values["ray_cora_samples_per_second"] > 0


def test_bad_shard_assignment_and_missing_files_are_named(served, data_dir, tmp_path):
    client, _, _ = served
    with pytest.raises(DataError, match="split 'valid' has 2 shard file\\(s\\) for 3 ranks"):
        _actors(data_dir, client, world=3, split="valid")
    broken = tmp_path / "data"
    broken.mkdir()
    for p in data_dir.iterdir():
        if p.is_file():
            (broken / p.name).write_bytes(p.read_bytes())
    (broken / "shards").mkdir()
    for p in (data_dir / "shards").iterdir():
        if p.name != "train-000003.tar":
            (broken / "shards" / p.name).write_bytes(p.read_bytes())
    actor = InteractionShard.options(num_cpus=0.1).remote(str(broken), "train", 1, 2, batch_size=BATCH, seed=0,
                                                           embeddings=client)
    with pytest.raises(ray.exceptions.RayActorError, match="shard file .*train-000003.tar is missing"):
        ray.get(actor.describe.remote())


def test_ids_outside_the_table_surface_in_the_trainer(ray_local, data_dir, tmp_path):
    from .conftest import write_table
    small = np.zeros((3, 8), np.float32)                             # far fewer users than the data has
    write_table(tmp_path / "user_embeddings.parquet", "user", small)
    write_table(tmp_path / "item_embeddings.parquet", "item", np.zeros((500, 8), np.float32))
    client = start_embedding_servers(str(tmp_path), shards=1, dim=8, num_cpus=0.1)
    actors = _actors(data_dir, client)
    with pytest.raises(ray.exceptions.RayTaskError, match="user id \\d+ is outside the table \\(ids 0..2\\)"):
        _run(actors, epoch=0)
