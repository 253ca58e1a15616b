"""InteractionShard actors: exactly-once across ranks, resume from a cursor, killed actors come back at
their cursor, metrics, bad input."""

import dataclasses
import json
import os
import re
import signal
import time
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds

from cluster import plan, runtime
from cluster.client import BatchIterator, DataActorLost
from cluster.embeddings import start_embedding_servers
from cluster.interactions import DataError, InteractionShard, read_shard, split_shards, start_interaction_shards
from cora.data.schema import read_manifest

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


def _padding(per_rank):
    """(padded slots, real tokens) over every batch of every rank: each (B, T) input minus its prompts."""
    real = sum(int(b["lengths"][b["weights"] > 0].sum()) for batches in per_rank for b in batches)
    return sum(b["input_ids"].size for batches in per_rank for b in batches) - real, real


def test_length_bucketing_serves_every_sample_once_with_less_padding_and_resumes_exactly(served, data_dir):
    client, _, _ = served
    plain, _ = _run(_actors(data_dir, client), epoch=3)
    actors = _actors(data_dir, client, bucket_window=4, pad_multiple=8)
    full, _ = _run(actors, epoch=3)
    train = pq.read_table(data_dir / "train.parquet").column("sample_id").to_pylist()
    for got in (plain, full):
        seen = _ids(got[0]) + _ids(got[1])
        assert len(seen) == len(set(seen)) and sorted(seen) == sorted(train)
    assert [len(b) for b in full] == [len(b) for b in plain]             # the same steps
    assert all(b["input_ids"].shape[1] % 8 == 0 for batches in full for b in batches)
    (wasted, real), (wasted_before, real_before) = _padding(full), _padding(plain)
    assert real == real_before and wasted < 0.5 * wasted_before, (wasted, wasted_before)
    head, its = _run(actors, epoch=3, steps=5)                      # mid-window: 5 of a window of 4 batches
    cursors = [plan.Cursor.from_dict(json.loads(json.dumps(it.cursor().to_dict()))) for it in its]
    assert all(c.bucket_window == 4 for c in cursors)
    for a in actors:
        ray.kill(a)
    tail, _ = _run(_actors(data_dir, client, bucket_window=4, pad_multiple=8), epoch=3, cursors=cursors)
    for r in range(2):
        assert _ids(head[r]) + _ids(tail[r]) == _ids(full[r])        # same samples, same order
    # a cursor written before the "step" order (no bucket_order: "rank") resumes in that order
    fresh = _actors(data_dir, client, bucket_window=4, pad_multiple=8)
    legacy = [dataclasses.replace(c, delivered=0, bucket_order="rank") for c in cursors]
    whole, _ = _run(fresh, epoch=3, cursors=legacy)
    rest, _ = _run(fresh, epoch=3, cursors=[dataclasses.replace(c, bucket_order="rank") for c in cursors])
    for r in range(2):
        assert _ids(whole[r][:5]) + _ids(rest[r]) == _ids(whole[r]) and _ids(whole[r]) != _ids(full[r])
    gap = lambda got: np.mean([abs(a["input_ids"].shape[1] - b["input_ids"].shape[1]) for a, b in zip(*got)])  # noqa: E731
    assert gap(full) < 0.6 * gap(whole), (gap(full), gap(whole))      # a step's ranks pad to similar lengths
    with pytest.raises(ValueError, match="bucket_window was 4, now 0"):
        BatchIterator(_actors(data_dir, client)[0], 3, cursors[0])


def _run_killing(actors, epoch, kill_after, victim, order):
    """Like _run, but SIGKILL ``victim``'s process once ``kill_after`` steps are handed over (its queue
    and the producers' are full by then), stepping the ranks in ``order``."""
    its = [BatchIterator(a, epoch) for a in actors]
    out, old_pid = [[] for _ in actors], None
    for k in range(len(its[0])):
        if k == kill_after:
            time.sleep(1.0)                                          # let every prefetch queue fill
            old_pid = ray.get(actors[victim].pid.remote())
            os.kill(old_pid, signal.SIGKILL)
        for r in order:
            out[r].append(next(its[r]))
            assert its[r].cursor().delivered == (k + 1) * BATCH      # the cursor stays right across a recovery
    for it in its:
        assert next(it, None) is None and it.exhausted
    assert ray.get(actors[victim].pid.remote()) != old_pid           # a new process
    return out, its


def _planned(data_dir, epoch, world=2):
    """The reference: per rank, the sample ids of each batch of ``epoch`` as plan.py assigns them, read
    from the shards the way the actors index them (by owner, in shard order)."""
    paths, sizes = split_shards(read_manifest(str(data_dir)), str(data_dir), "train")
    owned = [[json.loads(s["json"])["sample_id"] for s in wds.WebDataset(
        [paths[k] for k in plan.owned_shards(len(paths), r, world)], shardshuffle=False)] for r in range(world)]
    steps = plan.steps_per_epoch(sum(sizes), world, BATCH)
    return [[[owned[o][i] for o, i in b] for b in plan.batches(order, steps, BATCH)]
            for order in plan.epoch_lists(sizes, world, 7, epoch)]


def _check_planned(got, data_dir, epoch):
    want = _planned(data_dir, epoch)
    for r in range(len(want)):                                       # same batches, same order
        assert [_ids([b]) for b in got[r]] == want[r]
    seen = [i for batches in got for i in _ids(batches)]
    train = pq.read_table(data_dir / "train.parquet").column("sample_id").to_pylist()
    assert len(seen) == len(set(seen)) and sorted(seen) == sorted(train)  # each exactly once


def _borrowed(data_dir):
    """The batches of rank 1 (of 2) in epoch 0 that hold samples owned by rank 0."""
    _, sizes = split_shards(read_manifest(str(data_dir)), str(data_dir), "train")
    order = plan.epoch_lists(sizes, 2, 7, 0)[1]
    steps = plan.steps_per_epoch(sum(sizes), 2, BATCH)
    return [k for k, b in enumerate(plan.batches(order, steps, BATCH)) if any(o == 0 for o, _ in b)]


def test_a_killed_actor_comes_back_at_its_cursor(served, data_dir, capsys):
    client, _, _ = served
    actors = _actors(data_dir, client)
    # rank 1 restarts early; its producer then needs rank 0's samples (its tail), so finds its peer by name
    assert min(_borrowed(data_dir)) > 3 + 6                          # beyond what rank 1 had prefetched
    got, its = _run_killing(actors, 0, kill_after=3, victim=1, order=(0, 1))
    _check_planned(got, data_dir, 0)
    assert (its[0].recoveries, its[1].recoveries) == (0, 1) and len(its[1]) == len(got[1]) == 13
    err = capsys.readouterr().err          # the recovery starts after the 3 to 5 batches already fetched
    assert re.search(r"\[data\] train rank 1: actor restarted \(\w+\), resuming epoch 0 at sample "
                     r"(96|128|160) ", err), err
    for a in actors:
        ray.kill(a)


def test_a_killed_peer_comes_back_for_the_rank_that_borrows_its_samples(served, data_dir):
    client, _, _ = served
    actors = _actors(data_dir, client)
    # rank 1's batch 11 holds samples of rank 0: after 5 steps rank 1's producer waits just before it
    # (3 queued, 2 taken by calls in flight, 1 built); stepping rank 1 first, it asks the killed rank 0
    assert _borrowed(data_dir) == [11, 12]
    got, its = _run_killing(actors, 0, kill_after=5, victim=0, order=(1, 0))
    _check_planned(got, data_dir, 0)
    assert (its[0].recoveries, its[1].recoveries) == (1, 0)
    for a in actors:
        ray.kill(a)


def test_an_actor_that_cannot_come_back_and_a_stale_iterator_are_named(served, data_dir):
    client, _, _ = served
    actors = _actors(data_dir, client)
    stale = BatchIterator(actors[0], 1)
    next(stale)
    its = [BatchIterator(actors[0], 2), BatchIterator(actors[1], 2, max_recoveries=0)]
    with pytest.raises(RuntimeError, match="train rank 0, epoch 1: the actor ended the epoch after 3 of 13 "
                                           "batches because start_epoch was called again elsewhere"):
        list(stale)                       # the 2 batches asked for before the new start, then no more
    next(its[0]), next(its[1])
    os.kill(ray.get(actors[1].pid.remote()), signal.SIGKILL)
    with pytest.raises(DataActorLost, match="train rank 1, epoch 2: the InteractionShard actor failed 1 time\\(s\\) "
                                            "in this epoch, more than max_recoveries=0"):
        list(its[1])
    ray.kill(actors[0])                                              # for good: no restart
    with pytest.raises(DataActorLost, match="train rank 0, epoch 2: the InteractionShard actor did not come back"):
        list(its[0])
    ray.kill(actors[1])


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


def test_a_shard_reads_as_webdataset_reads_it_without_torch_and_a_cut_one_is_named(data_dir, tmp_path):
    """read_shard parses a prepared shard with the standard library's tarfile: the samples webdataset's own
    reader yields, in its order, checked against dataset.json, with torch never imported (the data actors'
    start-up); a shard cut short is a DataError naming the file, not a parse error from the middle of a tar."""
    import subprocess
    import sys
    manifest = read_manifest(str(data_dir))
    names = manifest["shards"]["train"]
    path = str(data_dir / names[1])
    want = [json.loads(s["json"]) for s in wds.WebDataset(path, shardshuffle=False)]
    code = ("import json, sys; from cluster.interactions import read_shard; "
            f"got = read_shard({path!r}, json.loads(sys.argv[1])); print(json.dumps(got)); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(manifest["files"][names[1]])], check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert json.loads(out[0]) == want and len(want) == 60
    assert out[1] == "False"
    cut = tmp_path / "cut.tar"
    data = (data_dir / names[1]).read_bytes()
    cut.write_bytes(data[:len(data) // 2 + 100])
    for entry in (manifest["files"][names[1]], None):     # checked; or not (a directory written before checksums)
        with pytest.raises(DataError, match="cut.tar"):
            read_shard(str(cut), entry)


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


@pytest.fixture(scope="module")
def multi_dir(tmp_path_factory):
    """OUT/source of a multi-domain preparation (movies and books samples), sized so the served tables
    (50 users, 40 items) cover its ids."""
    from trainer.cli import main
    out = tmp_path_factory.mktemp("cluster-domains") / "data"
    assert main(["prepare", "--source", "synthetic", "--domains", "movies,books,items", "--target-domain", "items",
                 "--out", str(out), "--users", "50", "--items", "20", "--interactions", "150",
                 "--samples-per-shard", "40", "--no-progress"]) == 0
    return out / "source"


@pytest.mark.parametrize("family", ["", "collm-"])
def test_each_sample_is_prompted_with_its_domains_template(served, multi_dir, family):
    """The prompt (and CoLLM's slots) of every sample of a mixed-domain directory is its own domain's
    template of the method's family, token for token."""
    from cora.llm import load_tokenizer
    from cora.prompts import PromptEncoder, get_template
    client, _, _ = served
    manifest = read_manifest(str(multi_dir))
    assert manifest["num_users"] <= 50 and manifest["num_items"] <= 40
    actors = _actors(multi_dir, client, template=family)
    per_rank, _ = _run(actors, epoch=0)
    paths, _ = split_shards(manifest, str(multi_dir), "train")
    by_id = {s["sample_id"]: s for s in (json.loads(x["json"]) for x in wds.WebDataset(paths, shardshuffle=False))}
    tok = load_tokenizer("smollm2")
    enc = {d: PromptEncoder(tok, get_template(family + d), 10, 256) for d in ("movies", "books")}
    seen = []
    for batches in per_rank:
        for b in batches:
            assert ("slots" in b) == bool(family)
            for k, (sid, w) in enumerate(zip(b["sample_ids"], b["weights"])):
                if w == 0:
                    continue
                s = by_id[int(sid)]
                ids, slots = enc[s["domain"]].encode_with_slots(s["history_titles"], s["title"])
                assert b["input_ids"][k, :b["lengths"][k]].tolist() == ids, (s["domain"], sid)
                if family:
                    assert b["slots"][k].tolist() == slots
                seen.append(s["domain"])
    assert sorted(seen) == sorted(s["domain"] for s in by_id.values())   # every sample, both domains
    assert set(seen) == {"movies", "books"}
    for a in actors:
        ray.kill(a)


def test_a_data_directory_in_object_storage_is_prepared_atomically_streamed_and_checked(served, data_dir, s3_server,
                                                                                        tmp_path, capsys):
    """`cora prepare --out s3://...` uploads dataset.json last; the actors stream their shards from the bucket
    (every train sample once over 2 ranks); a shard changed in the bucket fails its sha256 check; an upload
    that fails midway leaves a directory without dataset.json, which is refused as a data directory."""
    from cora.data.schema import DatasetError
    from cora.data.write import publish
    from cora.fileio import open_fs, read_bytes, read_parquet, storage_env, write_bytes
    from trainer.cli import main
    client, _, _ = served
    fs, _ = open_fs("s3://data-bucket", create_buckets=True)
    fs.create_dir("data-bucket")
    uri = f"s3://data-bucket/{tmp_path.name}"
    prepare = ["prepare", "--source", "synthetic", "--out", uri, "--users", "50", "--items", "40",
               "--interactions", "600", "--samples-per-shard", "60", "--no-progress"]
    assert main(prepare) == 0
    manifest = read_manifest(uri)
    assert main(prepare) == 0 and "already holds this dataset" in capsys.readouterr().err
    assert main([a if a != "600" else "500" for a in prepare]) == 2
    assert "already holds a different dataset" in capsys.readouterr().err
    actors = _actors(uri, client)
    per_rank, _ = _run(actors, epoch=0)
    want = read_parquet(f"{uri}/train.parquet").column("sample_id").to_pylist()
    assert sorted(_ids(per_rank[0]) + _ids(per_rank[1])) == sorted(want)
    for a in actors:
        ray.kill(a)
    shard = manifest["shards"]["train"][1]                          # rank 1's first shard, one label flipped
    data = read_bytes(f"{uri}/{shard}")
    k = data.index(b'"label": ') + len(b'"label": ')
    write_bytes(f"{uri}/{shard}", data[:k] + (b"1" if data[k:k + 1] == b"0" else b"0") + data[k + 1:])
    actor = InteractionShard.options(num_cpus=0.1, runtime_env={"env_vars": storage_env()}).remote(
        uri, "train", 1, 2, batch_size=BATCH, seed=0, embeddings=client)
    with pytest.raises(ray.exceptions.RayActorError, match=f"{shard} does not match the sha256 in the manifest"):
        ray.get(actor.describe.remote())
    local = tmp_path / "local"                                      # an upload that fails midway
    local.mkdir()
    for p in data_dir.rglob("*"):
        if p.is_file():
            (local / p.relative_to(data_dir)).parent.mkdir(parents=True, exist_ok=True)
            (local / p.relative_to(data_dir)).write_bytes(p.read_bytes())
    # a file that fails while it is read (reading /proc/self/mem at offset 0 is an I/O error on Linux)
    (local / "shards" / "zz-unreadable.tar").symlink_to("/proc/self/mem")
    with pytest.raises(DatasetError, match="has no dataset.json now"):
        publish(local, uri)
    with pytest.raises(DatasetError, match="is not a prepared data directory"):
        read_manifest(uri)
