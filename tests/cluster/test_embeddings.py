"""EmbeddingServer actors on a local Ray instance: exact rows across shards, restart, bad input."""

import os
import signal

import numpy as np
import pytest
import ray

from cluster.embeddings import EmbeddingError, start_embedding_servers

from .conftest import write_table


def test_lookups_equal_the_table_rows_across_shard_boundaries(ray_local, cf_dir):
    out, users, items = cf_dir
    client = start_embedding_servers(str(out), shards=3, dim=8, num_cpus=0.1)
    assert list(client.bounds["user"]) == list(np.linspace(0, len(users), 4).astype(int))
    rng = np.random.default_rng(1)
    ids = np.r_[rng.integers(0, len(users), 200), client.bounds["user"][1:-1], client.bounds["user"][1:-1] - 1]
    np.testing.assert_array_equal(client.lookup("user", ids), users[ids])     # shuffled table rows
    np.testing.assert_array_equal(client.lookup("item", ids % len(items)), items[ids % len(items)])


def test_killed_server_restarts_and_serves_the_same_values(ray_local, cf_dir):
    out, users, _ = cf_dir
    client = start_embedding_servers(str(out), shards=2, dim=8, num_cpus=0.1)
    ids = np.arange(len(users))
    before = client.lookup("user", ids)
    victim = client.servers["user"][1]
    pid = ray.get(victim.pid.remote())
    os.kill(pid, signal.SIGKILL)
    after = client.lookup("user", ids)                        # retried until the actor is back
    np.testing.assert_array_equal(after, before)
    assert ray.get(victim.pid.remote()) != pid                # a new process reloaded the shard


def test_bad_ids_dimension_and_missing_tables_are_named(ray_local, cf_dir, tmp_path):
    out, users, _ = cf_dir
    client = start_embedding_servers(str(out), shards=2, dim=8, num_cpus=0.1)
    with pytest.raises(EmbeddingError, match=f"user id {len(users) + 5} is outside the table"):
        client.lookup("user", np.array([0, len(users) + 5]))
    with pytest.raises(ray.exceptions.RayTaskError, match="item id -1 is outside this shard's range"):
        ray.get(client.servers["item"][0].lookup.remote(np.array([-1])))
    with pytest.raises(EmbeddingError, match="dimension 8, the configuration says 16"):
        start_embedding_servers(str(out), shards=1, dim=16)
    with pytest.raises(EmbeddingError, match="user_embeddings.parquet not found"):
        start_embedding_servers(str(tmp_path), shards=1)
    write_table(tmp_path / "user_embeddings.parquet", "user", users)
    write_table(tmp_path / "item_embeddings.parquet", "item", users[:3])
    with pytest.raises(EmbeddingError, match="cannot cut a table of 3 rows into 4 shards"):
        start_embedding_servers(str(tmp_path), shards=4)


def test_sasrec_user_vectors_are_computed_server_side(ray_local, data_dir, tmp_path):
    import torch

    from cora.cf.train import CFConfig, load_cf, train_cf
    cf = tmp_path / "sasrec"
    train_cf(str(data_dir), str(cf), CFConfig(model="sasrec", dim=16, max_epochs=1), progress=False)
    client = start_embedding_servers(str(cf), shards=2, dim=16, num_cpus=0.1, sasrec=True)
    model, _ = load_cf(cf)
    hist = np.array([[-1] * 24 + [3], [-1] * 25, list(range(25))], dtype=np.int64)
    with torch.no_grad():
        want = model.user_vectors_from_history(torch.as_tensor(hist)).numpy()
    got = client.user_vectors(hist)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.isfinite(got).all()


def test_tables_are_read_from_object_storage(ray_local, cf_dir, s3_server):
    import pyarrow.fs as pafs

    from cora.fileio import open_fs
    out, users, items = cf_dir
    fs, bucket = open_fs("s3://cf-bucket", create_buckets=True)
    fs.create_dir(bucket)
    for name in ("user_embeddings.parquet", "item_embeddings.parquet"):
        pafs.copy_files(str(out / name), f"{bucket}/run1/{name}", destination_filesystem=fs)
    client = start_embedding_servers("s3://cf-bucket/run1", shards=2, dim=8, num_cpus=0.1)
    ids = np.arange(len(users))
    np.testing.assert_array_equal(client.lookup("user", ids), users)
    with pytest.raises(EmbeddingError, match="s3://cf-bucket/missing/user_embeddings.parquet not found"):
        start_embedding_servers("s3://cf-bucket/missing", shards=1)
